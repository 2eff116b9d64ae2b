// Package qerr is the error type every migvisor package returns when a QMP client must see a
// particular error class and text. QEMU's QapiErrorClass values are the only classes; the qmp
// package turns any error into wire form with As, so the mapping lives in one place.
//
//	return qerr.Generic("incorrect cpu index specified")
//	return qerr.New(qerr.CommandNotFound, "The command foo has not been found")
package qerr
