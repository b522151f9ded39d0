;; An example corral routing policy in WebAssembly text (see docs/routing.md, "WASM policies").
;; ABI: exports `memory`, `alloc(len) -> ptr` and `decide(ptr, len) -> i64` (answer ptr << 32 | len);
;; the input is the request as JSON, the answer JSON: {"pass":true} or {"action":{...}}.
;;
;; This one looks at the request's metadata: tier "blocked" is refused, tier "premium" goes to the
;; remote chain, anything else passes (the next policy decides). No imports: it can touch nothing
;; but its own memory.
(module
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 0) "\"tier\":\"blocked\"")
  (data (i32.const 32) "\"tier\":\"premium\"")
  (data (i32.const 64) "{\"pass\":true}")
  (data (i32.const 96) "{\"action\":{\"type\":\"deny\",\"reason\":\"tenant tier is blocked\"}}")
  (data (i32.const 256) "{\"action\":{\"type\":\"require_llm\",\"reason\":\"premium tenants get the large model\"}}")

  ;; Hands out memory for the input (one request per instance: a bump allocator is enough).
  (func (export "alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $len)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.div_u (local.get $len) (i32.const 65536)) (i32.const 1))))))
    (local.get $p))

  ;; 1 when bytes [q, q+m) occur in [p, p+n), else 0.
  (func $contains (param $p i32) (param $n i32) (param $q i32) (param $m i32) (result i32)
    (local $i i32) (local $j i32)
    (block $absent
      (loop $outer
        (br_if $absent (i32.gt_u (i32.add (local.get $i) (local.get $m)) (local.get $n)))
        (local.set $j (i32.const 0))
        (block $mismatch
          (loop $inner
            (if (i32.eq (local.get $j) (local.get $m)) (then (return (i32.const 1))))
            (br_if $mismatch
              (i32.ne (i32.load8_u (i32.add (local.get $p) (i32.add (local.get $i) (local.get $j))))
                      (i32.load8_u (i32.add (local.get $q) (local.get $j)))))
            (local.set $j (i32.add (local.get $j) (i32.const 1)))
            (br $inner)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $outer)))
    (i32.const 0))

  (func $answer (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len))))

  (func (export "decide") (param $p i32) (param $n i32) (result i64)
    (if (call $contains (local.get $p) (local.get $n) (i32.const 0) (i32.const 16))
      (then (return (call $answer (i32.const 96) (i32.const 60)))))
    (if (call $contains (local.get $p) (local.get $n) (i32.const 32) (i32.const 16))
      (then (return (call $answer (i32.const 256) (i32.const 80)))))
    (call $answer (i32.const 64) (i32.const 13)))
)
