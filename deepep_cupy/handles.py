"""DeepEP's tuple view of a low-latency handle.

DeepEP v1 returns the low-latency dispatch handle as a tuple
``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)``, and user code
indexes or unpacks it (``handle[0]``, ``src_info, layout_range, *_ = handle``). Our handles are
named objects that carry more (the combine's inverse map, flags of the dispatch); this mixin lets
that code run unchanged on them.
"""

__all__ = ["DeepEPLowLatencyTuple"]


class DeepEPLowLatencyTuple:
    """Mixin: ``handle[i]``, ``len(handle)`` and iteration as DeepEP's 5-tuple
    ``(recv_src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)``.
    The class must provide those attributes; ``layout_range`` is computed on each access."""

    _DEEPEP_FIELDS = ("recv_src_info", "layout_range", "num_max_dispatch_tokens_per_rank", "hidden", "num_experts")

    def _deepep_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self._DEEPEP_FIELDS)

    def __getitem__(self, index):
        return self._deepep_tuple()[index]

    def __len__(self) -> int:
        return len(self._DEEPEP_FIELDS)

    def __iter__(self):
        return iter(self._deepep_tuple())
