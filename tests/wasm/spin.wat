;; spin() never returns: only an interruption ends it.
(module
  (func (export "spin")
    (loop $forever (br $forever)))
)
