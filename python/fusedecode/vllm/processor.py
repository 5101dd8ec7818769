"""``FusedecodeLogitsProcessor``: the vLLM logits processor (this module imports vLLM).

Load it in any of three ways (each builds one instance per engine; if two ways are combined, the
second instance in the same engine stays inert):

- ``LLM(..., logits_processors=[FusedecodeLogitsProcessor])``;
- ``LLM(..., logits_processors=["fusedecode.vllm:FusedecodeLogitsProcessor"])`` (also
  ``vllm serve --logits-processors fusedecode.vllm:FusedecodeLogitsProcessor``);
- nothing at all: installed fusedecode declares it in the ``vllm.logits_processors`` entry-point
  group, which vLLM loads into every engine. A request that sets no ``fusedecode_*`` option costs a
  dictionary lookup when it joins the batch and nothing per step.

One class serves both of vLLM's model runners: it subclasses Model Runner V2's interface
(``vllm.v1.worker.gpu.sample.logits_processor``, the default engine) where vLLM has it, and the V1
runner's (``vllm.v1.sample.logits_processor``: vLLM's CPU build, ``VLLM_USE_V2_MODEL_RUNNER=0``), so
both loaders accept it; the constructor's signature tells which runner built it, and the work goes to
``ModelRunnerV2Recorder`` or ``V1Recorder`` (the shared core is ``_recorder.Recorder``).
"""

import logging
import weakref

from vllm.v1.sample.logits_processor import LogitsProcessor as _V1LogitsProcessor
from vllm.v1.sample.logits_processor import MoveDirectionality

from ._options import options_of
from ._recorder import ASYNC_REFUSAL
from ._runner_v1 import V1Recorder
from ._runner_v2 import ModelRunnerV2Recorder

try:
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2LogitsProcessor
except ImportError:  # vLLM before Model Runner V2
    _V2LogitsProcessor = None

logger = logging.getLogger("fusedecode.vllm")

# The active instance per engine config: a second one built for the same engine stays inert.
_ACTIVE = {}


def _claim(instance, vllm_config):
    holder = _ACTIVE.get(id(vllm_config))
    other = holder() if holder is not None else None
    if other is not None and other._vllm_config is vllm_config:
        return False
    _ACTIVE[id(vllm_config)] = weakref.ref(instance)
    return True


def _tensor_parallel():
    """(rank, size) of this worker's tensor-parallel group; (0, 1) without distributed state."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # no distributed state (single process)
        return 0, 1


def _speculative_rows(vllm_config):
    """The most logits rows one request gets per step: 1 + the number of speculative tokens."""
    config = getattr(vllm_config, "speculative_config", None)
    return 1 + int(getattr(config, "num_speculative_tokens", 0) or 0) if config is not None else 1


_BASES = (_V1LogitsProcessor,) if _V2LogitsProcessor is None else (_V1LogitsProcessor, _V2LogitsProcessor)


class FusedecodeLogitsProcessor(*_BASES):
    """Per-token statistics and DeepConf's online early stop for the requests that ask
    (``SamplingParams.extra_args``, see ``fusedecode.vllm``), one fused ``logit_stats`` pass per step."""

    @classmethod
    def validate_params(cls, sampling_params):
        """Runs where the request is admitted (the API server's process): ``ValueError`` naming the
        option for anything invalid."""
        options_of(sampling_params)

    def __init__(self, vllm_config, *args, **kwargs):
        # V1: (vllm_config, device, is_pin_memory); Model Runner V2: (vllm_config, req_states);
        # positionally (as vLLM 0.29-0.33 call them) or by those names.
        if "req_states" in kwargs:
            args = (kwargs.pop("req_states"),)
        elif "device" in kwargs:
            args = (kwargs.pop("device"), kwargs.pop("is_pin_memory", False))
        if kwargs or len(args) not in (1, 2):
            raise TypeError(f"FusedecodeLogitsProcessor: unexpected constructor arguments {len(args)} positional, "
                            f"{sorted(kwargs)} named (vLLM's V1 and V2 signatures are supported)")
        self._vllm_config = vllm_config
        self._v1 = self._v2 = None
        if not _claim(self, vllm_config):
            logger.info("fusedecode: a second FusedecodeLogitsProcessor in this engine stays inert")
            return
        rank, size = _tensor_parallel()
        if len(args) == 1:
            (req_states,) = args
            parallel = getattr(vllm_config, "parallel_config", None)
            self._v2 = ModelRunnerV2Recorder(
                req_states, spare_rows=_speculative_rows(vllm_config), tp_rank=rank, tp_size=size,
                sharded=bool(getattr(parallel, "enable_batch_sharded_sampling", False)),
                pin_memory=req_states.device.type == "cuda")
            return
        device, is_pin_memory = args
        scheduler = getattr(vllm_config, "scheduler_config", None)
        refusal = ASYNC_REFUSAL if getattr(scheduler, "async_scheduling", False) else None
        # The V1 runner samples every row on every rank: rank 0 reports.
        self._v1 = V1Recorder(device, reporting=rank == 0, pin_memory=is_pin_memory, refuse_statistics=refusal)

    @property
    def inert(self):
        return self._v1 is None and self._v2 is None

    # ---------------------------------------------------------------------------- V1 model runner
    def is_argmax_invariant(self):
        # False: vLLM then calls apply on every batch, all-greedy ones included, with the logits
        # before temperature (and before penalties), and the early stop changes the argmax.
        return False

    def update_state(self, batch_update):
        recorder = self._v1
        if recorder is None:
            return
        recorder.resolve()
        if batch_update is not None:
            recorder.update_batch(
                batch_update.removed,
                [(index, params, output) for index, params, _prompt, output in batch_update.added],
                [(source, target, direction == MoveDirectionality.SWAP)
                 for source, target, direction in batch_update.moved])
        recorder.flush()

    def apply(self, logits, ctx=None):
        if self._v2 is not None:
            return self._v2.apply(logits, ctx)
        if self._v1 is not None and self._v1.active:
            self._v1.record(logits)
        return logits

    # ---------------------------------------------------------------------------- Model Runner V2
    def add_request(self, req_idx, sampling_params):
        return self._v2.add_request(req_idx, sampling_params) if self._v2 is not None else False

    def apply_staged_writes(self):
        if self._v2 is not None:
            self._v2.apply_staged_writes()
