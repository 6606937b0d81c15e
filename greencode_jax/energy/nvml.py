"""NVIDIA GPUs through NVML (`pynvml` from nvidia-ml-py): the energy counter, else polled power.

The NVML module is passed in (tests pass an autospecced `pynvml`). A JAX GPU is matched
to its NVML device by PCI bus id when the runtime can tell it (the CUDA driver's ordinal
already respects CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER), else through
CUDA_VISIBLE_DEVICES (UUIDs exactly, indices assuming PCI order). NVML enumerates in
PCI order, which need not be CUDA's. MIG is refused: NVML's figures are the whole GPU's.
"""

from __future__ import annotations

import ctypes
import time

from greencode_jax.energy.backend import Backend, Polled
from greencode_jax.energy.poller import PowerPoller
from greencode_jax.energy.result import COUNTER, INTEGRATED_POWER, DeviceReading


class Refused(Exception):
    """This GPU cannot be metered through NVML; the message says why."""


def load_nvml():
    """`(pynvml, None)` once NVML is initialised, or `(None, reason)`.

    NVML stays initialised for the process: nvmlInit is reference-counted, and shutting
    it down here could pull it from under other users in the same process.
    """
    try:
        import pynvml
    except ImportError as error:
        return None, f"nvidia-ml-py is not installed ({error})"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return None, "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this machine"
    except pynvml.NVMLError as error:
        return None, f"nvmlInit failed: {error}"
    return pynvml, None


def nvml_versions(nvml) -> dict:
    versions = {}
    try:
        from importlib.metadata import version

        versions["nvidia-ml-py"] = version("nvidia-ml-py")
    except Exception:
        pass
    for key, call in (("driver", "nvmlSystemGetDriverVersion"), ("nvml", "nvmlSystemGetNVMLVersion")):
        try:
            versions[key] = str(getattr(nvml, call)())
        except nvml.NVMLError as error:
            versions[key] = f"unknown ({error})"
    return versions


def cuda_pci_bus_id(ordinal: int) -> str | None:
    """The PCI bus id of CUDA device `ordinal` from the CUDA driver, or None if it cannot say."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device, buffer = ctypes.c_int(), ctypes.create_string_buffer(32)
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), ordinal):
            return None
        if cuda.cuDeviceGetPCIBusId(buffer, len(buffer), device):
            return None
        return buffer.value.decode()
    except (OSError, AttributeError):
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def normalise_bus_id(bus_id: str) -> str:
    """'00000000:3B:00.0' (NVML) and '0000:3b:00.0' (CUDA) both become '0000:3b:00.0'."""
    parts = _text(bus_id).strip().lower().split(":")
    if len(parts) == 3:
        parts[0] = f"{int(parts[0], 16):04x}"
    return ":".join(parts)


def resolve_gpu(nvml, spec, env: dict, bus_id_of=cuda_pci_bus_id):
    """(NVML handle, identity, warnings) for a JAX GPU `spec`; raises `Refused` with the reason."""
    ordinal = spec.local_hardware_id if spec.local_hardware_id is not None else spec.index
    count = nvml.nvmlDeviceGetCount()
    warnings = []
    bus_id = spec.pci_bus_id or bus_id_of(ordinal)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",")] if visible is not None else None
    entry = entries[ordinal] if entries is not None and ordinal < len(entries) else None
    if entry is not None and entry.startswith("MIG-"):
        raise Refused(f"CUDA_VISIBLE_DEVICES entry {entry!r} is a MIG slice: NVML measures whole GPUs, "
                      "so a slice's energy cannot be told apart")
    if bus_id:
        wanted = normalise_bus_id(bus_id)
        matches = [i for i in range(count)
                   if normalise_bus_id(nvml.nvmlDeviceGetPciInfo(nvml.nvmlDeviceGetHandleByIndex(i)).busId) == wanted]
        if not matches:
            raise Refused(f"no NVML device has PCI bus id {bus_id}")
        index, mapped_by = matches[0], "pci_bus_id"
    elif entries is not None:
        if entry is None:
            raise Refused(f"JAX GPU ordinal {ordinal} has no entry in CUDA_VISIBLE_DEVICES={visible!r}")
        if entry.startswith("GPU-"):
            uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
            matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(entry)]
            if len(matches) != 1:
                raise Refused(f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {len(matches)} NVML GPUs")
            index, mapped_by = matches[0], "uuid in CUDA_VISIBLE_DEVICES"
        else:
            try:
                index = int(entry)
            except ValueError:
                raise Refused(f"CUDA_VISIBLE_DEVICES entry {entry!r} is neither an index nor a GPU UUID") from None
            mapped_by = "index in CUDA_VISIBLE_DEVICES"
    else:
        index, mapped_by = ordinal, "index"
    if mapped_by.startswith("index") and count > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        warnings.append("GPU matched to NVML by index, assuming CUDA enumerates in PCI order as NVML does; "
                        "set CUDA_DEVICE_ORDER=PCI_BUS_ID (or list GPU UUIDs in CUDA_VISIBLE_DEVICES) to be sure")
    if not 0 <= index < count:
        raise Refused(f"NVML index {index} is out of range: NVML sees {count} GPU(s)")
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    try:
        mig_enabled = nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
    except nvml.NVMLError:  # NOT_SUPPORTED: a GPU without MIG
        mig_enabled = False
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    if mig_enabled:
        raise Refused(f"MIG is enabled on NVML GPU {index} ({uuid}): NVML measures the whole GPU, "
                      "so a MIG slice's energy cannot be told apart")
    identity = {**spec.identity(), "name": _text(nvml.nvmlDeviceGetName(handle)), "uuid": uuid,
                "pci_bus_id": _text(nvml.nvmlDeviceGetPciInfo(handle).busId), "nvml_index": index,
                "mapped_by": mapped_by}
    return handle, identity, warnings


def _field_number(field) -> float:
    # nvmlValueType_t order: double, unsigned int, unsigned long, unsigned long long,
    # signed long long, signed int, unsigned short.
    names = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
    return float(getattr(field.value, names[field.valueType] if field.valueType < len(names) else "uiVal"))


def instant_power_reader(nvml, handle):
    """read() for the poller: NVML_FI_DEV_POWER_INSTANT in W, stamped by the driver (µs since 1970)."""
    def read():
        field = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
        if field.nvmlReturn != nvml.NVML_SUCCESS:
            raise nvml.NVMLError(field.nvmlReturn)
        stamp = field.timestamp / 1e6 if field.timestamp else time.time()
        return stamp, [_field_number(field) / 1000.0]  # mW -> W
    return read


def average_power_reader(nvml, handle):
    """read() for the poller: nvmlDeviceGetPowerUsage in W (a ~1 s average on Ampere and newer)."""
    def read():
        return time.time(), [nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0]
    return read


class NvmlCounter(Backend):
    """nvmlDeviceGetTotalEnergyConsumption (mJ since the driver loaded), read at both ends."""

    name, method = "nvml_counter", COUNTER

    def __init__(self, device, reason, nvml, handle, counter_period_s: float, versions=None, notes=()):
        super().__init__(device, reason, versions, notes)
        self.nvml, self.handle = nvml, handle
        self.counter_period_s = counter_period_s

    def _read(self):
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)), None
        except self.nvml.NVMLError as error:
            return None, f"{type(error).__name__}: {error}"

    def begin(self):
        value, error = self._read()
        return time.perf_counter(), value, error

    def end(self, mark) -> DeviceReading:
        start, begin_mj, begin_error = mark
        end_mj, end_error = self._read()
        duration = time.perf_counter() - start
        raw = {"begin_mj": begin_mj, "end_mj": end_mj, "unit": "mJ", "counter": "nvmlDeviceGetTotalEnergyConsumption"}
        warnings = []
        if duration < self.counter_period_s:
            warnings.append(f"window of {duration:.4f} s is shorter than the counter's update period "
                            f"(~{self.counter_period_s} s): the figure is coarse")
        failure = None
        if begin_error or end_error:
            failure = f"NVML error at the window's {'start' if begin_error else 'end'}: {begin_error or end_error}"
        elif end_mj < begin_mj:
            failure = (f"the energy counter went backwards ({begin_mj} -> {end_mj} mJ): "
                       "the driver was reloaded or the counter reset")
        elif end_mj == begin_mj:
            failure = (f"the energy counter did not advance in {duration:.4f} s (it updates every "
                       f"~{self.counter_period_s} s): 0 J would not be a measurement")
        if failure:
            warnings.append(failure)
            return self.reading(None, duration, failure=failure, raw=raw, warnings=warnings)
        return self.reading((end_mj - begin_mj) / 1000.0, duration, raw=raw, warnings=warnings)


def nvml_power_backend(device, reason, nvml, handle, interval_s, versions, notes=()):
    """Polled power: the instant field where the driver has it, else the averaged power usage."""
    try:
        instant = instant_power_reader(nvml, handle)
        instant()
        read, source = instant, "NVML_FI_DEV_POWER_INSTANT"
    except nvml.NVMLError:
        read, source = average_power_reader(nvml, handle), "nvmlDeviceGetPowerUsage"
        read()  # raises NVMLError (e.g. NOT_SUPPORTED) when there is no power reading at all
    backend = Polled(device, reason, PowerPoller(read, interval_s, name=f"nvml{device.get('nvml_index', '')}"),
                     name="nvml_power", method=INTEGRATED_POWER, versions=versions, notes=notes,
                     raw={"power_source": source, "unit": "W"})
    if source == "nvmlDeviceGetPowerUsage":
        backend.assumptions["power_source"] = ("nvmlDeviceGetPowerUsage is a ~1 s moving average on Ampere and "
                                               "newer: short windows blur into their neighbours")
    return backend


def power_limit_w(nvml, handle) -> float | None:
    try:
        return nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
    except nvml.NVMLError:
        return None

