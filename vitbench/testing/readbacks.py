"""Counts the values a piece of code reads back from the device: the hot path reads none (tests/unit/test_optim.py,
bench/step_costs.py)."""

import torch

READBACKS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")


class CountReadbacks:
    """Counts the Tensor methods that copy a value to the host (each a device synchronization on a GPU)."""

    def __enter__(self):
        self.calls, self.saved = [], {name: getattr(torch.Tensor, name) for name in READBACKS}
        for name, original in self.saved.items():
            def counted(t, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(t, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
