"""``FusedecodeLogitsProcessor``: the vLLM logits processor (this module imports vLLM).

Load it in any of three ways (each builds one instance per engine; if two ways are combined, the
second instance in the same engine stays inert):

- ``LLM(..., logits_processors=[FusedecodeLogitsProcessor])``;
- ``LLM(..., logits_processors=["fusedecode.vllm:FusedecodeLogitsProcessor"])`` (also
  ``vllm serve --logits-processors fusedecode.vllm:FusedecodeLogitsProcessor``);
- nothing at all: installed fusedecode declares it in the ``vllm.logits_processors`` entry-point
  group, which vLLM loads into every engine. A request that sets no ``fusedecode_*`` option costs a
  dictionary lookup when it joins the batch and nothing per step.

It implements the V1 model runner's interface (``vllm.v1.sample.logits_processor``: vLLM's CPU build,
and GPUs with ``VLLM_USE_V2_MODEL_RUNNER=0``). It also subclasses the Model Runner V2 interface where
vLLM has it, so that the entry point does not stop a V2 engine from starting, but under V2 it records
nothing and does not stop early: a request that asks is reported as refused (an error from
``fusedecode.vllm.generate``, a warning in the engine log). See docs/vllm.md.
"""

import logging
import weakref

from vllm.v1.sample.logits_processor import LogitsProcessor as _V1LogitsProcessor
from vllm.v1.sample.logits_processor import MoveDirectionality

from ._options import options_of
from ._recorder import ASYNC_REFUSAL, V2_REFUSAL, StepRecorder

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


def _reporting_rank():
    """Only tensor-parallel rank 0 sends statistics (every rank samples the same rows)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank
        return get_tensor_model_parallel_rank() == 0
    except Exception:  # no distributed state (single process)
        return True


_BASES = (_V1LogitsProcessor,) if _V2LogitsProcessor is None else (_V1LogitsProcessor, _V2LogitsProcessor)


class FusedecodeLogitsProcessor(*_BASES):
    """Per-token statistics and DeepConf's online early stop for the requests that ask
    (``SamplingParams.extra_args``, see ``fusedecode.vllm``), one fused ``logit_stats`` pass per step."""

    @classmethod
    def validate_params(cls, sampling_params):
        """Runs where the request is admitted (the API server's process): ``ValueError`` naming the
        option for anything invalid."""
        options_of(sampling_params)

    def __init__(self, vllm_config, *args):
        # V1: (vllm_config, device, is_pin_memory); Model Runner V2: (vllm_config, req_states).
        self._vllm_config = vllm_config
        self._recorder = None
        self._refused_v2 = None
        if len(args) == 1:
            self._refused_v2 = StepRecorder("cpu", reporting=_reporting_rank(), refuse_statistics=V2_REFUSAL)
            return
        device, is_pin_memory = args
        if not _claim(self, vllm_config):
            logger.info("fusedecode: a second FusedecodeLogitsProcessor in this engine stays inert")
            return
        scheduler = getattr(vllm_config, "scheduler_config", None)
        refusal = ASYNC_REFUSAL if getattr(scheduler, "async_scheduling", False) else None
        self._recorder = StepRecorder(device, reporting=_reporting_rank(), pin_memory=is_pin_memory,
                                      refuse_statistics=refusal)

    @property
    def inert(self):
        return self._recorder is None

    def is_argmax_invariant(self):
        # False: vLLM then calls apply on every batch, all-greedy ones included, with the logits
        # before temperature (and before penalties), and the early stop changes the argmax.
        return False

    def update_state(self, batch_update):
        recorder = self._recorder
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
        recorder = self._recorder
        if recorder is not None and recorder.active:
            recorder.record(logits)
        return logits

    # Model Runner V2 (refused, see the module docstring)
    def add_request(self, req_idx, sampling_params):
        if self._refused_v2 is None:
            return False
        try:
            options = options_of(sampling_params)
        except ValueError:
            return False
        if options is not None:
            logger.warning("fusedecode: %s The request runs without fusedecode.", V2_REFUSAL)
            self._refused_v2.refuse(options, V2_REFUSAL)
            self._refused_v2.flush()
        return False

    def apply_staged_writes(self):
        pass
