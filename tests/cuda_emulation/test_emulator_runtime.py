"""The emulator itself: CUDA semantics it must reproduce, misuse it must report (instead of hanging
or guessing), its 16-bit conversions and its source translation. The kernels are in
drivers/probes.cu."""

import os
import re

import pytest
import torch

from cuda_emulation import emulator as emulator_module
from cuda_emulation.emulator import EmulatorError, Memory
from fusedecode.ops.logit_stats import OUTPUTS as LOGIT_STATS_OUTPUTS
from cuda_emulation.translate import TranslationError, translate

# Probe numbers of drivers/probes.cu.
UNEVEN_SHUFFLES, SHUFFLE_KINDS, VOTES, BARRIER_AFTER_EXIT, LAST_BLOCK_MERGES, SHARED_UNINITIALISED = range(6)
EXITED_LANE, DIVERGENT_BARRIERS, BARRIER_IN_COLLECTIVE, MASK_WITHOUT_CALLER, LANE_OUTSIDE_MASK, MISMATCHED = \
    range(10, 16)
READS_PAST_END, WRITES_PAST_END, NEVER_FINISHES, STACK_OVERFLOW, TRIVIAL, MISALIGNED_VECTOR_LOAD = range(16, 22)


def shuffle_model(values, kind, arg, width):
    """What each lane of one warp gets from a shuffle (CUDA programming guide, warp shuffle functions)."""
    out = []
    for lane in range(32):
        segment = lane & ~(width - 1)
        if kind == "idx":
            source = segment + (arg & (width - 1))
        elif kind == "up":
            source = lane - arg if lane - arg >= segment else lane
        elif kind == "down":
            source = lane + arg if lane + arg < segment + width else lane
        else:
            source = lane ^ arg if (lane ^ arg) < segment + width else lane
        out.append(values[source])
    return out


def test_warps_run_different_numbers_of_shuffles(emulator):
    # Warp w shuffles 3 + 4w times, then odd warps w more times after a block barrier: collectives
    # are warp-scoped, so this completes, with the values a GPU gives.
    threads = 256
    out, _, error = emulator.probe(UNEVEN_SHUFFLES, threads, out_size=threads)
    assert error == 0
    expected = []
    for warp in range(threads // 32):
        v = [warp * 32 + lane for lane in range(32)]
        for round_ in range(3 + 4 * warp):
            other = shuffle_model(v, "xor", 1 << (round_ % 5), 32)
            v = [a + b for a, b in zip(v, other)]
        if warp % 2 == 1:
            for round_ in range(warp):
                v = [v[(lane + round_) % 32] + 1 for lane in range(32)]
        expected += v
    assert out.tolist() == expected


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("arg", [0, 1, 3, 5, 17, 40])
def test_shuffle_kinds_and_widths(emulator, width, arg):
    threads = 64
    out, _, _ = emulator.probe(SHUFFLE_KINDS, threads, arg=arg, width=width)
    got = out.view(threads, 4)
    for warp in range(threads // 32):
        values = [1000 + warp * 32 + lane for lane in range(32)]
        for k, kind in enumerate(("idx", "up", "down", "xor")):
            assert got[warp * 32:(warp + 1) * 32, k].tolist() == shuffle_model(values, kind, arg, width), (kind, warp)


def test_warp_ballot_any_and_all_votes(emulator, generator):
    threads = 96
    predicate = (torch.rand(threads, generator=generator) < 0.5).to(torch.int64)
    predicate[64:] = 1  # a warp where all agree
    out, _, _ = emulator.probe(VOTES, threads, input=predicate)
    got = out[:3 * threads].view(threads, 3)
    for t in range(threads):
        lanes = predicate[t // 32 * 32:(t // 32 + 1) * 32].tolist()
        ballot = sum(1 << lane for lane, p in enumerate(lanes) if p)
        assert got[t].tolist() == [ballot, int(any(lanes)), int(all(lanes))]


def test_barrier_counts_exited_threads_as_arrived(emulator):
    out, _, _ = emulator.probe(BARRIER_AFTER_EXIT, 128)
    assert out[:32].tolist() == [10 * (31 - t) for t in range(32)]
    assert (out[32:] == -7).all()  # the exited warps wrote nothing


@pytest.mark.parametrize("blocks", [1, 2, 37])
def test_last_block_merges(emulator, blocks):
    out, _, _ = emulator.probe(LAST_BLOCK_MERGES, 32, blocks=blocks, buffer=torch.full((blocks,), -1))
    assert out[0].item() == blocks * (blocks - 1) // 2
    last = {"ascending": blocks - 1, "descending": 0}.get(emulator.schedule.blocks)
    if last is not None:
        assert out[1].item() == last
    counters = emulator.counters()
    assert counters["launches"] >= 1 and counters["blocks"] >= blocks


def test_shared_memory_is_poisoned_for_every_block(emulator):
    # Block 0 writes 7 into its shared memory after reading it; blocks 1 and 2 still find the poison.
    out, _, _ = emulator.probe(SHARED_UNINITIALISED, 64, blocks=3, memory=Memory(poison=0x5A))
    assert out[:192].tolist() == [0x5A] * 192


MISUSE = [
    (EXITED_LANE, 32, r"exited"),
    (DIVERGENT_BARRIERS, 64, r"different __syncthreads"),
    (BARRIER_IN_COLLECTIVE, 64, r"deadlock: .*__syncthreads.*__shfl_sync|deadlock: .*__shfl_sync.*__syncthreads"),
    (MASK_WITHOUT_CALLER, 32, r"does not include the calling lane"),
    (LANE_OUTSIDE_MASK, 32, r"reads lane 20, which is not in its mask"),
    (MISMATCHED, 32, r"different warp collectives"),
]


@pytest.mark.parametrize("probe, threads, message", MISUSE, ids=[m[2][:24] for m in MISUSE])
def test_misuse_is_reported(emulator, probe, threads, message):
    with pytest.raises(EmulatorError, match=message) as caught:
        emulator.probe(probe, threads)
    assert "drivers/probes.cu" in str(caught.value)  # the report names the source
    # The emulator is usable again after an aborted launch.
    out, _, _ = emulator.probe(TRIVIAL, 32)
    assert out[:32].tolist() == [1] * 32


def test_out_of_bounds_read_faults_with_the_buffer_named(emulator):
    values = torch.arange(10)
    with pytest.raises(EmulatorError, match=r"out-of-bounds access 0 bytes after the end of fenced buffer"):
        emulator.probe(READS_PAST_END, 2, input=values, memory=Memory(at_end=True))
    out, _, _ = emulator.probe(READS_PAST_END, 1, input=values, memory=Memory(at_end=True))
    assert out[0].item() == 9


@pytest.mark.parametrize("at_end", [False, True])
def test_out_of_bounds_write_is_reported(emulator, at_end):
    message = "out-of-bounds access 0 bytes after the end" if at_end else "out-of-bounds write: byte after the end"
    with pytest.raises(EmulatorError, match=message):
        emulator.probe(WRITES_PAST_END, 32, buffer=torch.zeros(5, dtype=torch.int64), memory=Memory(at_end=at_end))


def test_a_kernel_that_never_finishes_times_out(emulator):
    emulator.timeout_s = 0.5
    try:
        with pytest.raises(EmulatorError, match="timeout"):
            emulator.probe(NEVER_FINISHES, 32, buffer=torch.zeros(1, dtype=torch.int64))
    finally:
        emulator.timeout_s = 300.0


def test_stack_overflow_is_reported(emulator):
    with pytest.raises(EmulatorError, match="stack overflow of thread"):
        emulator.probe(STACK_OVERFLOW, 32)


@pytest.mark.parametrize("plain, message", [(0, r"__ldcs at 0x[0-9a-f]+: misaligned for a 16-byte access"),
                                            (1, r"undefined behaviour trapped \(-fsanitize=alignment")])
def test_misaligned_vector_loads_fault_as_on_the_gpu(emulator, plain, message):
    values = torch.arange(64)
    with pytest.raises(EmulatorError, match=message):
        emulator.probe(MISALIGNED_VECTOR_LOAD, 4, input=values, arg=plain)


@pytest.mark.parametrize("threads, blocks", [(2048, 1), (0, 1), (32, 0)])
def test_invalid_launch_configuration_is_a_cuda_error(emulator, threads, blocks):
    out, _, error = emulator.probe(TRIVIAL, threads, blocks=blocks, out_size=8)
    assert error == 9  # cudaErrorInvalidConfiguration, from cudaGetLastError as on a GPU
    assert (out == -7).all()


# ------------------------------------------------------------------------------------------------
# 16-bit conversions: every pattern, against torch


@pytest.mark.parametrize("dtype, kind", [(torch.float16, 0), (torch.bfloat16, 1)])
def test_16_bit_to_float_exact_for_every_pattern(emulator_library, dtype, kind):
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    got = emulator_library.convert(kind, bits)
    want = bits.view(dtype).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype, kind", [(torch.float16, 2), (torch.bfloat16, 3)])
def test_float_to_16_bit_rounds_to_nearest_even(emulator_library, dtype, kind, generator):
    random_bits = torch.randint(-2**31, 2**31, (1 << 20,), generator=generator, dtype=torch.int64).to(torch.int32)
    # Exact ties and their neighbours for every 16-bit value: the rounding boundaries.
    step = 13 if dtype == torch.float16 else 16
    upper = torch.arange(0, 2**16, dtype=torch.int64) << step
    ties = torch.cat([upper + (1 << (step - 1)) + d for d in (-1, 0, 1)]).to(torch.int64)
    ties = torch.where(ties >= 2**31, ties - 2**32, ties).to(torch.int32)
    values = torch.cat([random_bits, ties, torch.tensor([0, -2**31], dtype=torch.int32)]).view(torch.float32)
    values = torch.cat([values, torch.tensor([65504.0, 65519.99, 65520.0, 1e-8, 2.0**-25, 2.0**-24 * 1.5,
                                              float("inf"), -float("inf"), 3.4e38])])
    got = emulator_library.convert(kind, values)
    want = values.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got.view(dtype)), nan)
    mismatch = (got != want.view(torch.int16)) & ~nan
    assert not mismatch.any(), f"{values[mismatch][:5].tolist()}: {got[mismatch][:5]} != {want.view(torch.int16)[mismatch][:5]}"


# ------------------------------------------------------------------------------------------------
# The translation step


def test_translate_launches_and_shared_memory_keeping_lines():
    source = """#include <x>
// a comment with kernel<<<1, 2>>>(x) that must stay
template <typename T>
void launch(int n, cudaStream_t stream) {
  __shared__ float table[kRows ? 4 : 2][32];
  my::kernel<T, Tag<1, 2>><<<dim3(n, 1),
                              256, 0, stream>>>(a,
      b);
  other<<<n, 32>>>();
  const char* s = "__shared__ int x; k<<<1,1>>>()";
}
"""
    out = translate(source, "src/file.cuh")
    lines = out.splitlines()
    assert lines[0] == '#line 1 "src/file.cuh"'
    assert len(lines) == len(source.splitlines()) + 1
    assert "// a comment with kernel<<<1, 2>>>(x) that must stay" in lines[2]
    assert lines[5].strip() == "static float table[kRows ? 4 : 2][32]; FDEMU_SHARED_DECLARED(table);"
    assert re.search(r'launch_kernel\(::fdemu::Site\{__FILE__, __LINE__\}, "my::kernel<T, Tag<1, 2>>", '
                     r'my::kernel<T, Tag<1, 2>>, dim3\(n, 1\), 256, 0, stream, a, b\)$', lines[6])
    assert lines[7].strip() == "" and lines[8].strip() == ";"  # what followed the launch keeps its line
    assert re.search(r'"other", other, n, 32, 0, nullptr\);', lines[9])
    assert lines[10] == '  const char* s = "__shared__ int x; k<<<1,1>>>()";'


@pytest.mark.parametrize("source", ["extern __shared__ float dynamic[];", "__shared__ int a = 3;",
                                    "__shared__ int a, b;", "k<<<1>>>(x);"])
def test_translate_rejects_what_it_cannot_emulate(source):
    with pytest.raises(TranslationError):
        translate("void f() { " + source + " }", "x.cu")


def test_kernel_headers_use_only_what_the_translation_handles():
    # Every `<<<` and `__shared__` of the CUDA headers is rewritten (an untranslated __shared__
    # would not compile: the compatibility header turns it into an error).
    from cuda_emulation.build import KERNEL_HEADERS

    if not os.path.isdir(KERNEL_HEADERS):
        pytest.skip("no source tree")
    for name in os.listdir(KERNEL_HEADERS):
        with open(os.path.join(KERNEL_HEADERS, name)) as handle:
            text = translate(handle.read(), name)
        code = "\n".join(line.split("//")[0] for line in text.splitlines())
        assert "<<<" not in code and not re.search(r"\b__shared__\b", code), name


# ------------------------------------------------------------------------------------------------
# The call structs: the drivers and emulator.py expand the C++ output list, the emulator allocates
# from the Python table

CPP_ELEMENT_TYPES = {"float": torch.float32, "int64_t": torch.int64}


def test_cpp_output_list_equals_the_python_table():
    if not os.path.exists(emulator_module.STATS_OUTPUTS_HEADER):
        pytest.skip("no source tree")
    cpp = [(o.name, CPP_ELEMENT_TYPES[o.type], None if o.requested_by == "always" else o.requested_by)
           for o in emulator_module.cpp_stats_outputs()]
    assert cpp == [(o.name, o.dtype, o.requested_by) for o in LOGIT_STATS_OUTPUTS]


def test_output_list_parser_refuses_what_is_not_an_entry(tmp_path):
    # A line of the macro that is not one X(...) entry (a comment, two entries) stops the parse
    # instead of dropping an output from the call structs.
    good = "#define FUSEDECODE_LOGIT_STATS_OUTPUTS(X) \\\n  X(a, float, always) \\\n  X(b, int64_t, topk)\n"
    header = tmp_path / "good.h"
    header.write_text(good)
    assert emulator_module.cpp_stats_outputs(str(header)) == (("a", "float", "always"), ("b", "int64_t", "topk"))
    for bad in ("  X(a, float, always) X(c, float, always) \\\n", "  /* X(a, float, always) */ \\\n",
                "  Y(a, float, always) \\\n"):
        header = tmp_path / "bad.h"
        header.write_text("#define FUSEDECODE_LOGIT_STATS_OUTPUTS(X) \\\n" + bad + "  X(b, int64_t, topk)\n")
        with pytest.raises(ValueError, match="not an X"):
            emulator_module.cpp_stats_outputs(str(header))


def test_a_name_the_call_struct_lacks_is_refused():
    if not os.path.exists(emulator_module.STATS_OUTPUTS_HEADER):
        pytest.skip("no source tree")
    with pytest.raises(TypeError, match="no member"):
        emulator_module._strict_call(emulator_module.call_types().logit_stats, entropy=0, entrpy=0)
