"""Where the host's time goes in a jit of N decode layer calls, from JAX's own
profiler (XLA's host trace and CUPTI's driver-API and kernel records).
For each form it prints the median wall time per jit call, then, per
profiler line (host thread, GPU stream), the events with the most total
time over the traced calls, and the host events of one call in order.
  layers: N moe layer calls (own routing each), T tokens (the bench's form)
  ffi:    N one-CTA launches through the FFI launcher (cuda.quantize_mx)
  fusion: N tiny XLA fusions
usage: python3 bench/host_profile.py PRESET QUANT T [N] [FORM,...]"""

import collections
import glob
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

from jax_mxfp4_moe.tools import bench
from jax_mxfp4_moe.cuda import backend as cuda


def _forms(preset, quant, T, n):
    p = bench.PRESETS[preset]
    x = jax.random.normal(jax.random.key(T), (T, p.hidden), jnp.bfloat16)
    forms = {}

    def layers():
        w = bench.random_weights(p, jax.random.key(42))
        ids, tw = bench.random_routings(p, T, n, seed=T)
        f = jax.jit(lambda w, x, tws, idss: [cuda.moe(x, w, tw, ids, activation=p.activation,
                                                      quant=quant) for tw, ids in zip(tws, idss)])
        return f, (w, x, tuple(map(jnp.asarray, tw)), tuple(map(jnp.asarray, ids)))

    forms["layers"] = layers
    forms["ffi"] = lambda: (jax.jit(lambda x: [cuda.quantize_mx(x[:1, :32] + i, "mxfp8")
                                              for i in range(n)]), (x,))
    forms["fusion"] = lambda: (jax.jit(lambda x: [x[:1, :32] * i for i in range(n)]), (x,))
    return forms


def _report(path, calls, top=12):
    data = ProfileData.from_file(path)
    for plane in data.planes:
        for line in plane.lines:
            events = list(line.events)
            if not events:
                continue
            agg = collections.defaultdict(lambda: [0, 0])
            for e in events:
                a = agg[e.name[:90]]
                a[0] += 1
                a[1] += e.duration_ns
            span = (max(e.end_ns for e in events) - min(e.start_ns for e in events)) / 1e3
            print(f"  [{plane.name} | {line.name}] {len(events)} events over {span:.0f} us")
            for name, (cnt, dur) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
                print(f"    {dur / 1e3 / calls:9.1f} us/call  x{cnt / calls:5.1f}  {name}")
    # The GPU's last events in order, with the gap before each.
    for plane in data.planes:
        if not plane.name.startswith("/device"):
            continue
        for line in plane.lines:
            events = sorted(line.events, key=lambda e: e.start_ns)[-48:]
            if not events:
                continue
            print(f"  last events of [{plane.name} | {line.name}] (start us, gap us, duration us):")
            t0, end = events[0].start_ns, events[0].start_ns
            for e in events:
                print(f"    {(e.start_ns - t0) / 1e3:8.1f} {(e.start_ns - end) / 1e3:6.1f} "
                      f"{e.duration_ns / 1e3:7.1f}  {e.name[:60]}")
                end = e.end_ns
    # One call's host events in order: the busiest host thread, last call.
    host = [l for pl in data.planes if pl.name.startswith("/host") for l in pl.lines]
    if host:
        line = max(host, key=lambda l: sum(e.duration_ns for e in l.events))
        events = sorted(line.events, key=lambda e: e.start_ns)
        tail = events[-min(len(events), 150):]
        t0 = tail[0].start_ns
        print(f"  last events of [{line.name}] (start us, duration us):")
        for e in tail:
            print(f"    {(e.start_ns - t0) / 1e3:8.1f} {e.duration_ns / 1e3:7.1f}  {e.name[:100]}")


def main(preset, quant, T, n, names):
    print(f"# {jax.devices()[0].device_kind}: {preset} {quant} T={T} N={n}", flush=True)
    forms = _forms(preset, quant, T, n)
    for name in names:
        f, args = forms[name]()
        t = statistics.median(bench._time(f, *args, reps=50, warmup=3))
        print(f"== {name}: {t * 1e6:.1f} us per jit call, {t * 1e6 / n:.1f} us per op", flush=True)
        piped = statistics.median(bench._time_pipelined(f, *args, reps=20))
        print(f"   pipelined (bench._time_pipelined): {piped * 1e6:.1f} us per jit call", flush=True)
        calls = 5
        for mode in ("one at a time", "pipelined"):
            print(f"-- profile, {calls} calls {mode}")
            with tempfile.TemporaryDirectory() as d:
                opts = jax.profiler.ProfileOptions()
                opts.python_tracer_level = 0
                opts.host_tracer_level = 3  # XLA's per-thunk host events
                with jax.profiler.trace(d, profiler_options=opts):
                    for _ in range(calls):
                        out = f(*args)
                        if mode == "one at a time":
                            jax.block_until_ready(out)
                    jax.block_until_ready(out)
                _report(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0], calls)
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 8,
         sys.argv[5].split(",") if len(sys.argv) > 5 else ["layers", "ffi", "fusion"])
