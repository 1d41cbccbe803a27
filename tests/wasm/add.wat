;; Plain exports covering every numeric type, no result, and multi-value.
(module
  (func (export "add") (param i32 i32) (result i32)
    (i32.add (local.get 0) (local.get 1)))
  (func (export "mul64") (param i64 i64) (result i64)
    (i64.mul (local.get 0) (local.get 1)))
  ;; f64 * promoted f32
  (func (export "scale") (param f64 f32) (result f64)
    (f64.mul (local.get 0) (f64.promote_f32 (local.get 1))))
  (func (export "half") (param f32) (result f32)
    (f32.div (local.get 0) (f32.const 2)))
  (func (export "noop"))
  ;; multi-value: (i32 42, f64 2.5)
  (func (export "pair") (result i32 f64)
    (i32.const 42) (f64.const 2.5))
  (memory (export "memory") 1)
)
