package migration

import (
	"errors"
	"net"
	"strings"
	"syscall"

	"github.com/migvisor/migvisor/qerr"
)

// QEMU's texts (migration/migration.c, migration/options.c of QEMU 10), and migvisor's own
// where QEMU has none. Every error a QMP client sees comes from here.
var (
	errInProgress      = qerr.Generic("There's a migration process in progress")
	errWaitingIncoming = qerr.Generic("Guest is waiting for an incoming migration")
	errPostmigrate     = qerr.Generic("Can't migrate the vm that was paused due to previous migration")
	errNoPausedResume  = qerr.Generic("Cannot resume if there is no paused migration")
	errURIOrChannels   = qerr.Generic("need either 'uri' or 'channels' argument")
	errNoMainChannel   = qerr.Generic("Channel list has no main entry")
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

func errIncomingState(state string) *qerr.Error {
	return qerr.Generic("Illegal migration incoming state: %s", state)
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

func errParsePort(addr string) *qerr.Error {
	return qerr.Generic("error parsing port in address '%s'", addr)
}

func errNoTLSCreds(id string) *qerr.Error {
	return qerr.Generic("No TLS credentials with id '%s'", id)
}

// QEMU 10's texts for transports that cannot be opened (migration/migration.c,
// util/qemu-sockets.c, migration/file.c); an errno is rendered as C's strerror renders it.
var errInvalidUnixAddress = qerr.Generic("invalid Unix socket address")

func errUnknownProtocol(uri string) *qerr.Error {
	return qerr.Generic("unknown migration protocol: %s", uri)
}

func errUnixPathTooLong(path string) *qerr.Error {
	return qerr.Generic("UNIX socket path '%s' is too long", path)
}

func errUnixUnlink(path string, err error) *qerr.Error {
	return qerr.Generic("Failed to unlink socket %s: %s", path, strerror(err))
}

func errUnixBind(path string, err error) *qerr.Error {
	return qerr.Generic("Failed to bind socket to %s: %s", path, strerror(err))
}

func errInetBind(err error) *qerr.Error {
	return qerr.Generic("Failed to bind socket: %s", strerror(err))
}

// errNoPort is QEMU's text when every address it tried to bind was in use.
func errNoPort(err error) *qerr.Error {
	return qerr.Generic("Failed to find an available port: %s", strerror(err))
}

func errListenSocket(err error) *qerr.Error {
	return qerr.Generic("Failed to listen on socket: %s", strerror(err))
}

func errConnect(target string, err error) *qerr.Error {
	return qerr.Generic("Failed to connect to '%s': %s", target, strerror(err))
}

func errResolve(host, port string, err error) *qerr.Error {
	return qerr.Generic("address resolution failed for %s:%s: %s", host, port, strerror(err))
}

func errOpenFile(name string, err error) *qerr.Error {
	return qerr.Generic("Could not open '%s': %s", name, strerror(err))
}

func errCreateFile(name string, err error) *qerr.Error {
	return qerr.Generic("Could not create '%s': %s", name, strerror(err))
}

// strerror renders err as QEMU's error_setg_errno and gai_strerror do: an errno as C's
// strerror (Go's table with a lower-case first letter), a failed name or service lookup as
// getaddrinfo's.
func strerror(err error) string {
	var dns *net.DNSError
	var addr *net.AddrError
	var errno syscall.Errno
	switch {
	case errors.As(err, &dns) && strings.Contains(dns.Err, "port"),
		errors.As(err, &addr) && strings.Contains(addr.Err, "port"):
		return "Servname not supported for ai_socktype"
	case errors.As(err, &dns) && dns.IsNotFound:
		return "Name or service not known"
	case errors.As(err, &dns) && dns.IsTemporary:
		return "Temporary failure in name resolution"
	case errors.As(err, &errno):
		s := errno.Error()
		return strings.ToUpper(s[:1]) + s[1:]
	}
	return err.Error()
}

// migvisor's own, for transports that cannot be opened.
var errExecNoArgs = qerr.Generic("exec migration needs at least one argument")

func errFileOffset(opt string) *qerr.Error {
	return qerr.Generic("file migration URI has a bad offset: %s", opt)
}

func errRunCommand(err error) *qerr.Error {
	return qerr.Generic("Failed to run the migration command: %v", err)
}
