;; boom() hits unreachable; div(a, b) traps on b = 0.
(module
  (func (export "boom") unreachable)
  (func (export "div") (param i32 i32) (result i32)
    (i32.div_s (local.get 0) (local.get 1)))
)
