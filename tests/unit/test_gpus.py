"""NVML inventory -> ray start settings, on fixtures; and discovery on this GPU-less machine."""

from __future__ import annotations

from cluster.node.gpus import Gpu, Inventory, MigInstance, discover, ray_gpu_options

H100 = "NVIDIA H100 80GB HBM3"


def test_no_gpu_is_a_cpu_node() -> None:
    options = ray_gpu_options(Inventory())
    assert options.num_gpus == 0 and options.env == {} and options.resources == {}
    assert options.labels == {"hyperfleet/accelerator": "none"}


def test_discovery_without_nvml_is_not_an_error() -> None:
    inventory = discover()  # this machine has no NVIDIA driver
    assert inventory.gpus == ()
    assert inventory.error is not None and "NVML" in inventory.error
    assert ray_gpu_options(inventory).num_gpus == 0


def test_whole_gpus() -> None:
    inventory = Inventory(
        gpus=(Gpu(1, "GPU-b", H100, 81559), Gpu(0, "GPU-a", H100, 81559)), driver="580.1"
    )
    options = ray_gpu_options(inventory)
    assert options.num_gpus == 2
    assert options.env == {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}
    assert options.resources == {}
    assert options.labels == {"hyperfleet/accelerator": "h100-80gb-hbm3"}


def test_mixed_mig_profiles_become_devices_and_resources() -> None:
    mig = (
        MigInstance("MIG-1", "1g.10gb"),
        MigInstance("MIG-2", "1g.10gb"),
        MigInstance("MIG-3", "3g.40gb"),
    )
    inventory = Inventory(gpus=(Gpu(0, "GPU-a", H100, 81559, mig), Gpu(1, "GPU-b", H100, 81559)))
    options = ray_gpu_options(inventory)
    assert options.num_gpus == 4
    assert options.env == {"CUDA_VISIBLE_DEVICES": "MIG-1,MIG-2,MIG-3,GPU-b"}
    assert options.resources == {"hyperfleet_mig_1g.10gb": 2.0, "hyperfleet_mig_3g.40gb": 1.0}
    assert options.labels["hyperfleet/mig-profiles"] == "1g_10gb.3g_40gb"


class FakeNvml:
    """NVML's calls as pynvml exposes them, answering for one MIG-enabled GPU with a gap."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.65"

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetName(self, handle: str) -> str:
        return {"gpu0": H100, "mig0": f"{H100} MIG 1g.10gb", "mig2": f"{H100} MIG 2g.20gb"}[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> object:
        return type("Memory", (), {"total": 80 * 1024**3})()

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return {"gpu0": "GPU-x", "mig0": "MIG-a", "mig2": "MIG-c"}[handle]

    def nvmlDeviceGetMigMode(self, handle: str) -> tuple[int, int]:
        return (1, 1)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: str) -> int:
        return 3

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: str, slot: int) -> str:
        if slot == 1:
            raise self.NVMLError("not found")
        return f"mig{slot}"


def test_discovery_reads_mig_instances_through_nvml_calls() -> None:
    inventory = discover(FakeNvml())
    (gpu,) = inventory.gpus
    assert inventory.driver == "580.65" and gpu.memory_mb == 81920
    assert gpu.mig == (MigInstance("MIG-a", "1g.10gb"), MigInstance("MIG-c", "2g.20gb"))
