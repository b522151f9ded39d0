"""Which llama.cpp the exactness references come from (imported before `llama_cpp`).

corral's kernels reproduce ggml's AVX2 arithmetic (its lanes, its order of sums), whatever the
CPU. On a CPU with AVX-512, the llama.cpp peer that scripts/install-llama-cpp.sh builds uses it
(for the speed comparisons) and sums in other lanes, so its logits differ from the AVX2 kernels'
in the last digits and greedy near-ties can go the other way. The same script then also builds
an AVX2-only llama-cpp-python into target/llama-cpp-avx2; the reference scripts import that one,
and mark its version (`+ggml-avx2`) so that references cached from the other build are remade.
On such a CPU without that build, a reference script stops (rather than compare against sums
corral does not claim to reproduce). CORRAL_REFERENCE_LLAMA=host imports the host's build
instead, to measure it.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX2_BUILD = os.path.join(ROOT, "target", "llama-cpp-avx2")


def _has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " avx512f " in f" {line.split(':', 1)[1].strip()} "
    except OSError:
        pass
    return False


if os.environ.get("CORRAL_REFERENCE_LLAMA") == "host":
    # Measuring the host's own build (docs/performance.md compares both builds' closeness to
    # exact arithmetic); never what the tests compare against.
    pass
elif os.path.isdir(os.path.join(AVX2_BUILD, "llama_cpp")):
    sys.path.insert(0, AVX2_BUILD)
    import llama_cpp  # noqa: E402

    if not llama_cpp.__version__.endswith("+ggml-avx2"):
        llama_cpp.__version__ += "+ggml-avx2"
elif _has_avx512():
    raise SystemExit(
        f"this CPU has AVX-512: the exactness references need the AVX2-only llama.cpp build in "
        f"{AVX2_BUILD} (scripts/install-llama-cpp.sh makes it)")
