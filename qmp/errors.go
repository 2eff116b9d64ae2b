package qmp

import (
	"bytes"
	"fmt"

	"github.com/migvisor/migvisor/qerr"
)

// QEMU's texts, as a QMP client sees them (qobject/json-*.c, qapi/qmp-dispatch.c, monitor/qmp*.c).

// JSON reader.
const (
	errPrematureEOI     = "premature EOI"
	errExpectingValue   = "expecting value"
	errSeparatorDict    = "expected separator in dict"
	errSeparatorList    = "expected separator in list"
	errKeyNotString     = "key is not a string in object"
	errMissingColon     = "missing : in object pair"
	errDuplicateKey     = "duplicate key"
	errInvalidEscape    = "invalid escape sequence in string"
	errInvalidUTF8      = "invalid UTF-8 sequence in string"
	errInvalidCodepoint = "%s is not a valid Unicode character"
	errInvalidKeyword   = "invalid keyword '%s'"

	errTokenSize  = "JSON token size limit exceeded"
	errTokenCount = "JSON token count limit exceeded"
	errNesting    = "JSON nesting depth limit exceeded"
)

// parseError is a syntax error of the JSON parser: QEMU prefixes them all alike, after
// formatting the message into a 1024-byte buffer (so a long keyword is cut short).
func parseError(format string, args ...any) *qerr.Error {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > 1023 {
		msg = msg[:1023]
	}
	return qerr.Generic("JSON parse error, %s", msg)
}

// strayError is a lexical error; text is the token up to and including the offending byte,
// printed as a C string (a NUL byte ends it).
func strayError(text []byte) *qerr.Error {
	if i := bytes.IndexByte(text, 0); i >= 0 {
		text = text[:i]
	}
	return qerr.Generic("JSON parse error, stray '%s'", text)
}

// Request envelope and dispatch.
const (
	errNotObject    = "QMP input must be a JSON object"
	errLacksExecute = "QMP input lacks member 'execute'"
	errArgsObject   = "QMP input member 'arguments' must be an object"
)

func errUnexpectedMember(name string) *qerr.Error {
	return qerr.Generic("QMP input member '%s' is unexpected", name)
}

func errMustBeString(name string) *qerr.Error {
	return qerr.Generic("QMP input member '%s' must be a string", name)
}

func errClash(later, earlier string) *qerr.Error {
	return qerr.Generic("QMP input member '%s' clashes with '%s'", later, earlier)
}

func errCommandNotFound(cmd string) *qerr.Error {
	return qerr.New(qerr.CommandNotFound, fmt.Sprintf("The command %s has not been found", cmd))
}

func errNoOOB(cmd string) *qerr.Error {
	return qerr.Generic("The command %s does not support OOB", cmd)
}

// Capabilities negotiation.
const (
	errExpectingNegotiation = "Expecting capabilities negotiation with 'qmp_capabilities'"
	errAlreadyNegotiated    = "Capabilities negotiation is already complete, command ignored"
	errCapsNotAvailable     = "Capability %s not available"
)
