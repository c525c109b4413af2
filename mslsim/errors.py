"""What the simulator raises. Every error names the kernel and, where it can, the line."""


class SimulatorError(RuntimeError):
    """Base class: the kernel could not be simulated or misbehaved."""


class ClangMissing(SimulatorError):
    """No clang >= 17 found (apt-get install clang-19 libclang-rt-19-dev)."""


class CompileError(SimulatorError):
    """clang rejected the kernel (or the simulator's shim lacks a feature)."""


class KernelFault(SimulatorError):
    """The runtime caught a fault: divergent barrier, deadlock, out-of-bounds
    write into a guard or past a threadgroup array, threadgroup memory over 32 KiB."""


class KernelCrash(SimulatorError):
    """The kernel killed its process (segmentation fault, division by zero...)."""


class SanitizerReport(SimulatorError):
    """AddressSanitizer, UndefinedBehaviorSanitizer or ThreadSanitizer reported an error."""


class ScheduleDependence(SimulatorError):
    """Outputs changed with the thread schedule or the poison value: a missing
    barrier or a read of memory nobody wrote."""
