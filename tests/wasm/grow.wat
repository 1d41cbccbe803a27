;; grow() grows linear memory one page at a time until memory.grow fails (-1), then traps,
;; so the only cause of the trap is a refused allocation.
(module
  (memory (export "memory") 1)
  (func (export "grow")
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable)
)
