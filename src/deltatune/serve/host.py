"""The base model and its adapters, owned by the server's worker thread.

Every method that changes the model (:meth:`ModelHost.add`, :meth:`ModelHost.remove`,
:meth:`ModelHost.ensure_loaded`) runs on the one thread that also runs the forwards, between batches, so a
forward never sees a half-injected adapter. Other threads only read :attr:`ModelHost.specs` and call
:meth:`ModelHost.read`, which reads and checks an adapter's files and makes its tensors on the device
without touching the model: a runtime load does that first, off the worker, so the worker only inserts
(empty layers on the ``meta`` device, then the tensors assigned) and requests for other adapters go on.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterable, NamedTuple, Optional

from torch import nn

from .adapters import AdapterSpec
from .dispatch import Dispatcher
from .errors import ServeError


class ReadAdapter(NamedTuple):
    """An adapter's files, read and checked, its tensors already on the model's device."""

    config: object
    weights: dict


class ModelHost:
    """A base model, the adapters it may serve (``specs``) and those on the device now (LRU order).

    Args:
        model: The base transformers model, in eval mode, on its device.
        peft_class: The PeftModel class the first adapter is loaded with (its ``from_pretrained``).
        max_loaded: At most this many adapters on the device (None: no limit); pinned ones count.
        dispatch: Batching mode for :class:`~.dispatch.Dispatcher` (auto, mixed, grouped).
    """

    def __init__(self, model: nn.Module, peft_class: type, max_loaded: Optional[int] = None, dispatch: str = "auto"):
        if max_loaded is not None and max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.base, self.peft_class, self.max_loaded = model, peft_class, max_loaded
        self.peft = None  # the PeftModel, made when the first adapter is loaded
        self.base_params = {n for n, _ in model.named_parameters()}
        self.specs: dict[str, AdapterSpec] = {}
        self.loaded: "OrderedDict[str, None]" = OrderedDict()  # least recently used first
        self.dispatcher = Dispatcher(self.activate, dispatch)
        self.loads = 0  # adapter loads from disk, first loads and reloads after eviction

    @property
    def model(self) -> nn.Module:
        """What to call: the PeftModel once an adapter was loaded, else the base."""
        return self.peft if self.peft is not None else self.base

    @contextlib.contextmanager
    def activate(self, name: Optional[str]):
        """Run adapter ``name`` alone inside the block (None: the base model, adapters switched off)."""
        if self.peft is None:
            yield
        elif name is None:
            with self.peft.disable_adapter():
                yield
        else:
            self.peft.set_adapter(name)
            yield

    # ------------------------------------------------------------------ adapters (worker thread only)
    def add(self, spec: AdapterSpec, files: Optional[ReadAdapter] = None) -> None:
        """Register ``spec`` and load it now (from ``files`` when the caller read them already, see
        :meth:`read`), so a bad adapter is refused at once. On error nothing changes (the load itself puts
        the model back)."""
        if spec.name in self.specs:
            raise ServeError(409, f"an adapter named {spec.name!r} is already loaded; unload it first",
                             param="lora_name")
        if self.max_loaded is not None and spec.pinned and sum(s.pinned for s in self.specs.values()) >= self.max_loaded:
            raise ServeError(400, f"--max-loaded-adapters {self.max_loaded} is below the number of command-line adapters")
        self.specs[spec.name] = spec
        try:
            self.ensure_loaded([spec.name], files={spec.name: files} if files is not None else {})
        except Exception:
            del self.specs[spec.name]
            raise

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` and free its tensors."""
        if name not in self.specs:
            raise ServeError(404, f"no adapter named {name!r} is loaded", param="lora_name")
        if name in self.loaded:
            self._unload(name)
        del self.specs[name]
        self.dispatcher.forget(name)

    def admits(self, names: Iterable[Optional[str]]) -> bool:
        """Whether adapters ``names`` fit on the device together (next to the pinned ones)."""
        if self.max_loaded is None:
            return True
        wanted = {n for n in names if n is not None and n in self.specs and not self.specs[n].pinned}
        pinned = sum(s.pinned for s in self.specs.values())
        return len(wanted) + pinned <= self.max_loaded

    def ensure_loaded(self, names: Iterable[Optional[str]], keep: Iterable[Optional[str]] = (),
                      files: Optional[dict] = None) -> None:
        """Load every adapter of ``names`` not on the device, evicting the least recently used unpinned
        adapters that neither ``names`` nor ``keep`` (the rest of the batch) needs; ``files``: adapters
        already read (:meth:`read`) by name, the others are read from disk here."""
        needed = [n for n in dict.fromkeys(names) if n is not None]
        spare = set(needed) | set(keep)
        for name in needed:
            if name not in self.specs:
                raise ServeError(404, f"no adapter named {name!r} is loaded")
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while self.max_loaded is not None and len(self.loaded) >= self.max_loaded:
                victim = next((n for n in self.loaded if not self.specs[n].pinned and n not in spare), None)
                if victim is None:
                    raise ServeError(503, f"adapter {name!r} cannot be loaded: all {self.max_loaded} slots "
                                          "(--max-loaded-adapters) are in use")
                self._unload(victim)
            self._load(self.specs[name], (files or {}).get(name))

    def read(self, spec: AdapterSpec) -> ReadAdapter:
        """Read and check adapter ``spec``'s files and put its tensors on the model's device. It does not
        touch the model, so any thread may call it (a runtime load calls it off the worker).

        Raises:
            ServeError: 422 for files that cannot be read or hold bad values.
        """
        from ..checkpoint import CheckpointError, read_adapter
        from ..config import ConfigError

        try:
            files = read_adapter(spec.path)
        except (CheckpointError, ConfigError, ValueError, TypeError, KeyError, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ServeError(422, f"adapter {spec.name!r} cannot be read: {first}") from None
        device = next(self.base.parameters()).device
        return ReadAdapter(files.config.for_load(False), {k: v.to(device) for k, v in files.weights.items()})

    def _load(self, spec: AdapterSpec, files: Optional[ReadAdapter] = None) -> None:
        """Insert adapter ``spec`` (read from disk first unless ``files`` holds it). Its layers are made
        empty on the ``meta`` device and take the read tensors by assignment: no initialisation."""
        from ..checkpoint import CheckpointError
        from ..config import ConfigError
        from ..injection import Undo
        from ..mapping import set_peft_model_state_dict
        from ..targeting import TargetError

        files = files if files is not None else self.read(spec)
        head = self._head()
        resized = spec.num_labels and isinstance(head, nn.Linear) and head.out_features != spec.num_labels
        if resized:
            # An adapter's head is a copy of the base head made when the adapter is added; a copy of another
            # size lets each task keep its own number of classes on one base.
            self._set_head(nn.Linear(head.in_features, spec.num_labels, bias=head.bias is not None,
                                     device="meta", dtype=head.weight.dtype))
        first = self.peft is None
        undo = Undo(self.base if first else self.peft)  # a failed load puts all of it back
        try:
            if first:
                self.peft = self.peft_class(self.base, files.config, spec.name, low_cpu_mem_usage=True)
            else:
                self.peft.add_adapter(spec.name, files.config, low_cpu_mem_usage=True)
            set_peft_model_state_dict(self.peft, files.weights, spec.name)
        except (CheckpointError, ConfigError, TargetError, ValueError, TypeError, FileNotFoundError) as exc:
            if first:
                self.peft = None
            else:
                self.peft.peft_config.pop(spec.name, None)
            undo()
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ServeError(422, f"adapter {spec.name!r} does not fit the base model: {first_line}") from None
        finally:
            if resized:
                self._set_head(head)
        self.peft.eval()
        self.loaded[spec.name] = None
        self.loads += 1

    def _unload(self, name: str) -> None:
        self.peft.delete_adapter(name)
        del self.loaded[name]

    def _head(self) -> Optional[nn.Module]:
        head = getattr(self.base, "classifier", None) or getattr(self.base, "score", None)
        return getattr(head, "original_module", head)  # under a modules_to_save wrapper: the base's own

    def _set_head(self, module: nn.Module) -> None:
        """Make ``module`` the base model's own head (inside the modules_to_save wrapper if there is one)."""
        attr = "classifier" if getattr(self.base, "classifier", None) is not None else "score"
        current = getattr(self.base, attr)
        if hasattr(current, "original_module"):
            current.original_module = module
        else:
            setattr(self.base, attr, module)

    def head_size(self, name: Optional[str]) -> int:
        """Classes of the head that rows of adapter ``name`` run (its own, else the base model's)."""
        spec = self.specs.get(name) if name is not None else None
        if spec is not None and spec.num_labels:
            return spec.num_labels
        head = self._head()
        return int(getattr(head, "out_features", 0) or getattr(self.base.config, "num_labels", 0))
