package vmm

import (
	"fmt"

	"github.com/migvisor/migvisor/qerr"
)

// The texts QEMU prints or returns for the same conditions (system/runstate.c, vl.c,
// accel/kvm/kvm-all.c, util/cutils.c, hw/core/machine-smp.c).
const (
	errNeedsReset      = "Resetting the Virtual Machine is required"
	errRingPowerOfTwo  = "dirty-ring-size must be a power of two."
	errRingTooBigFmt   = "KVM dirty ring size %d too big (maximum is %d).  Please use a smaller value."
	errRingEnableFmt   = "Enabling of KVM dirty ring failed: %s. Suggested minimum value is 1024."
	errSizeFmt         = "Parameter '%s' expects a non-negative number below 2^64"
	errSizeTooLarge    = "too large 'size' option value"
	errSizeMissing     = "missing 'size' option value"
	errNotPaused       = "vCPU state can only be read or written while the vCPUs are stopped"
	errCPUStateVersion = "vCPU state: unsupported format"
	errTooManyCPUsFmt  = "Invalid SMP CPUs %d. The max CPUs supported by machine '%s' is %d"
)

func errRingTooBig(n, max int) error { return qerr.Generic(errRingTooBigFmt, n, max) }

func errRingEnable(reason string) error { return qerr.Generic(errRingEnableFmt, reason) }

func errTooManyCPUs(n, max int) error { return qerr.Generic(errTooManyCPUsFmt, n, MachineName, max) }

func errSize(param string) error { return qerr.Generic(errSizeFmt, param) }

func errCPUState(format string, args ...any) error {
	return fmt.Errorf(errCPUStateVersion+": "+format, args...)
}
