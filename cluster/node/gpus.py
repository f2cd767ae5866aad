"""What a node's GPUs are, read with NVML, and what Ray should be told about them.

Ray detects whole GPUs on its own but not MIG instances, and a worker given a fractional GPU sees
the whole device. So the node agent reads the devices itself (``discover``) and turns them into
``ray start`` settings (``ray_gpu_options``, a pure function tested on fixtures):

- whole GPUs: ``CUDA_VISIBLE_DEVICES`` lists their UUIDs and ``--num-gpus`` counts them; agents ask
  for fractions of them (``num_gpus: 0.25``), which share a device without isolation;
- MIG instances: each is one device in ``CUDA_VISIBLE_DEVICES`` (``MIG-<uuid>``), counted in
  ``--num-gpus``, and each profile is also a custom resource ``hyperfleet_mig_<profile>``
  (``1g.10gb``) so an agent asking for a profile lands on a node that has it;
- labels say what the node has (``hyperfleet/accelerator``, ``hyperfleet/mig-profiles``).
A node without NVML or without GPUs is a CPU node: no error, no GPU settings.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hyperfleet.resources import MIG_RESOURCE_PREFIX

_PROFILE = re.compile(r"(\d+g\.\d+gb(?:\+me)?)", re.IGNORECASE)


@dataclass(frozen=True)
class MigInstance:
    uuid: str  # "MIG-..."
    profile: str  # "1g.10gb"


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mb: int
    mig: tuple[MigInstance, ...] = ()  # empty: MIG is off, the whole GPU is one device


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...] = ()
    driver: str | None = None
    error: str | None = None  # why NVML could not be read, for the node's log


@dataclass(frozen=True)
class RayGpuOptions:
    num_gpus: int = 0
    env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia ")).strip("-")[:63]


def ray_gpu_options(inventory: Inventory) -> RayGpuOptions:
    """The ``ray start`` GPU settings for what NVML reported."""
    if not inventory.gpus:
        return RayGpuOptions(labels={"hyperfleet/accelerator": "none"})
    devices: list[str] = []
    profiles: Counter[str] = Counter()
    for gpu in sorted(inventory.gpus, key=lambda g: g.index):
        if gpu.mig:
            for instance in gpu.mig:
                devices.append(instance.uuid)
                profiles[instance.profile] += 1
        else:
            devices.append(gpu.uuid)
    labels = {"hyperfleet/accelerator": _slug(inventory.gpus[0].name)}
    if profiles:
        labels["hyperfleet/mig-profiles"] = ".".join(p.replace(".", "_") for p in sorted(profiles))
    return RayGpuOptions(
        num_gpus=len(devices),
        env={"CUDA_VISIBLE_DEVICES": ",".join(devices)},
        resources={MIG_RESOURCE_PREFIX + p: float(n) for p, n in sorted(profiles.items())},
        labels=labels,
    )


def discover(nvml: Any = None) -> Inventory:
    """Reads the GPUs and MIG instances this node sees; never raises for a missing GPU stack."""
    if nvml is None:
        import pynvml

        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        return Inventory(error=f"NVML unavailable: {e}")
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        gpus = tuple(_read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
        return Inventory(gpus=gpus, driver=str(driver))
    except nvml.NVMLError as e:
        return Inventory(error=f"NVML failed: {e}")
    finally:
        nvml.nvmlShutdown()


def _read_gpu(nvml: Any, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = str(nvml.nvmlDeviceGetName(handle))
    memory_mb = int(nvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024))
    uuid = str(nvml.nvmlDeviceGetUUID(handle))
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # not MIG-capable
        current = 0
    instances: list[MigInstance] = []
    if current:
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:  # an empty slot
                continue
            match = _PROFILE.search(str(nvml.nvmlDeviceGetName(mig)))
            profile = match.group(1).lower() if match else "unknown"
            instances.append(MigInstance(str(nvml.nvmlDeviceGetUUID(mig)), profile))
    return Gpu(index, uuid, name, memory_mb, tuple(instances))
