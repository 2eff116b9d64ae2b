package schema

import (
	"fmt"

	"github.com/migvisor/migvisor/qerr"
)

// QEMU's texts for argument errors (qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c and
// the generated alternate visitors) and for an unknown command (qapi/qmp-dispatch.c).
const (
	msgMissing       = "Parameter '%s' is missing"
	msgUnexpected    = "Parameter '%s' is unexpected"
	msgInvalidType   = "Invalid parameter type for '%s', expected: %s"
	msgInvalidValue  = "Parameter '%s' expects %s"
	msgEnumValue     = "Parameter '%s' does not accept value '%s'"
	msgArgsNotObject = "QMP input member 'arguments' must be an object"
	msgNotFound      = "The command %s has not been found"
)

func errMissing(path string) error    { return qerr.Generic(msgMissing, path) }
func errUnexpected(path string) error { return qerr.Generic(msgUnexpected, path) }

func errInvalidType(path, expected string) error {
	return qerr.Generic(msgInvalidType, path, expected)
}

func errInvalidValue(path, expected string) error {
	return qerr.Generic(msgInvalidValue, path, expected)
}

func errEnumValue(name, val string) error { return qerr.Generic(msgEnumValue, name, val) }

func errNotFound(cmd string) error {
	return qerr.New(qerr.CommandNotFound, fmt.Sprintf(msgNotFound, cmd))
}
