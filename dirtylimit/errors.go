package dirtylimit

import (
	"fmt"

	"github.com/migvisor/migvisor/qerr"
)

// QEMU 10's texts (system/dirtylimit.c, migration/dirtyrate.c), byte for byte: clients match on
// them. The trailing quote of descNoRing is QEMU's own.
const (
	descNoRing          = "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'"
	descCPUIndex        = "incorrect cpu index specified"
	descSetMigrating    = "can't set dirty page rate limit while migration is running"
	descCancelMigrating = "can't cancel dirty page rate limit while migration is running"

	descBusy          = "the dirty rate is already being measured."
	descCalcTime      = "Calculation time is out of range [50ms, 60000ms]."
	descSampleMode    = "sample-pages is used only in page-sampling mode"
	descSampleRange   = "sample-pages is out of range[128, 16384]."
	descModeOff       = "mode %s is not enabled, use other method instead."
	descBadEnumFormat = "Parameter '%s' does not accept value '%s'"
)

// descClosed is migvisor's: a request that reaches a closed Limiter or Meter (the daemon is
// shutting down).
const descClosed = "the dirty page rate machinery is shut down"

func generic(desc string) error { return qerr.New(qerr.GenericError, desc) }

func errModeOff(m Mode) error { return qerr.New(qerr.GenericError, fmt.Sprintf(descModeOff, m)) }

func errBadEnum(param, value string) error {
	return qerr.New(qerr.GenericError, fmt.Sprintf(descBadEnumFormat, param, value))
}
