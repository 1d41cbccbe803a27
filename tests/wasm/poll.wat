;; poll_stdin() asks poll_oneoff whether stdin is readable: one fd_read subscription on fd 0
;; with userdata 7. Returns (errno, number of events, userdata of the first event, its type).
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "poll_stdin") (result i32 i32 i32 i32)
    (local $errno i32)
    ;; subscription at 0 (48 bytes): userdata = 7, tag = 1 (fd_read), fd = 0
    (i64.store (i32.const 0) (i64.const 7))
    (i32.store8 (i32.const 8) (i32.const 1))
    (i32.store (i32.const 16) (i32.const 0))
    ;; events at 64 (32 bytes each), count at 128
    (local.set $errno
      (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
    (local.get $errno)
    (i32.load (i32.const 128))
    (i32.wrap_i64 (i64.load (i32.const 64)))
    (i32.load8_u (i32.const 74)))
)
