package migration

import "github.com/migvisor/migvisor/qerr"

// QEMU's texts (migration/migration.c, migration/options.c of QEMU 10), and migvisor's own
// where QEMU has none. Every error a QMP client sees comes from here.
var (
	errInProgress      = qerr.Generic("There's a migration process in progress")
	errWaitingIncoming = qerr.Generic("Guest is waiting for an incoming migration")
	errPostmigrate     = qerr.Generic("Can't migrate the vm that was paused due to previous migration")
	errNoPausedResume  = qerr.Generic("Cannot resume if there is no paused migration")
	errURIOrChannels   = qerr.Generic("need either 'uri' or 'channels' argument")
	errNoMainChannel   = qerr.Generic("Channel list has no main entry")
	errBadProtocol     = qerr.Generic("Parameter 'uri' expects a valid migration protocol")
	errIncomingStarted = qerr.Generic("The incoming migration has already been started")
	errNoIncoming      = qerr.Generic("'-incoming' was not specified on the command line")
	errPauseNotPostcpy = qerr.Generic("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")

	errDirtyLimitAutoConverge = qerr.Generic("dirty-limit conflicts with auto-converge either of then available currently")
	errDirtyLimitNeedsRing    = qerr.Generic("dirty-limit requires KVM with accelerator property 'dirty-ring-size' set")
	errSwitchoverAck          = qerr.Generic("Capability 'switchover-ack' requires capability 'return-path'")
	errPostcopyMultifd        = qerr.Generic("Postcopy is not yet compatible with multifd")
	errMultifdXbzrle          = qerr.Generic("Multifd is not compatible with xbzrle")
	errPreemptNeedsPostcopy   = qerr.Generic("Postcopy preempt requires postcopy-ram")
	errZeroCopy               = qerr.Generic("Zero copy only available for non-compressed non-TLS multifd migration")
	errMappedRAMXbzrle        = qerr.Generic("Mapped-ram migration is incompatible with xbzrle")
	errMappedRAMPostcopy      = qerr.Generic("Mapped-ram migration is incompatible with postcopy")
	errNoCOLO                 = qerr.Generic("QEMU compiled without replication module can't enable COLO")
	// QEMU prefixes the host's reason; migvisor's is that it has no postcopy at all.
	errNoPostcopy = qerr.Generic("Postcopy is not supported: migvisor migrates with precopy only")

	errVCPUDirtyLimit = qerr.Generic("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s")
)

// errNotInState is migrate-continue's refusal, naming the state the migration is in.
func errNotInState(state string) *qerr.Error {
	return qerr.Generic("Migration not in expected state: %s", state)
}

func errDuplicateChannel(kind string) *qerr.Error {
	return qerr.Generic("Channel list has more than one %s entry", kind)
}

func errBackgroundSnapshot(cap string) *qerr.Error {
	return qerr.Generic("Background-snapshot is not compatible with %s", cap)
}

// errParam is QERR_INVALID_PARAMETER_VALUE: "Parameter '%s' expects %s".
func errParam(name, expects string) *qerr.Error {
	return qerr.Generic("Parameter '%s' expects %s", name, expects)
}

// migvisor's own refusals of what QEMU has and migvisor does not.
func errUnsupportedCapability(cap string) *qerr.Error {
	return qerr.Generic("Capability '%s' is not supported by migvisor", cap)
}

func errUnsupportedTransport(what string) *qerr.Error {
	return qerr.Generic("migvisor does not support the %s migration transport", what)
}

func errUnsupportedParameter(name, value string) *qerr.Error {
	return qerr.Generic("migvisor does not support %s '%s'", name, value)
}

var (
	errCPRChannel = qerr.Generic("migvisor does not support the 'cpr' migration channel")
	errCPRMode    = qerr.Generic("missing 'cpr' migration channel")
)

// QEMU's texts for addresses and credentials (util/qemu-sockets.c, migration/tls.c).
func errParseAddress(addr string) *qerr.Error {
	return qerr.Generic("error parsing address '%s'", addr)
}

// QEMU's texts for fd:NAME (monitor/fds.c, migration/fd.c).
func errFDNotFound(name string) *qerr.Error {
	return qerr.Generic("File descriptor named '%s' has not been found", name)
}

func errFDNumber(name string) *qerr.Error {
	return qerr.Generic("Invalid file descriptor number '%s'", name)
}

var errFDFile = qerr.Generic("fd: migration to a file is not supported. Use file: instead.")

func errNoTLSCreds(id string) *qerr.Error {
	return qerr.Generic("No TLS credentials with id '%s'", id)
}

// migvisor's own, for transports that cannot be opened.
var (
	errExecNoArgs   = qerr.Generic("exec migration needs at least one argument")
	errNoSocketPath = qerr.Generic("unix migration URI needs a socket path")
)

func errFileOffset(opt string) *qerr.Error {
	return qerr.Generic("file migration URI has a bad offset: %s", opt)
}

func errListen(a Address, err error) *qerr.Error {
	return qerr.Generic("Failed to listen on '%s': %v", a, err)
}

func errOpenFile(err error) *qerr.Error {
	return qerr.Generic("Failed to open the migration file: %v", err)
}

func errRunCommand(err error) *qerr.Error {
	return qerr.Generic("Failed to run the migration command: %v", err)
}
