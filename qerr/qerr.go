package qerr

import (
	"errors"
	"fmt"
)

// Class is QEMU's QapiErrorClass.
type Class string

// The classes QEMU 10 defines (qapi/error.json).
const (
	GenericError    Class = "GenericError"
	CommandNotFound Class = "CommandNotFound"
	DeviceNotActive Class = "DeviceNotActive"
	DeviceNotFound  Class = "DeviceNotFound"
	KVMMissingCap   Class = "KVMMissingCap"
)

// Error is an error as a QMP client sees it: a class and a description.
type Error struct {
	Class Class  `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Desc }

// New returns an error of the given class.
func New(class Class, desc string) *Error { return &Error{Class: class, Desc: desc} }

// Generic returns a GenericError whose text is formatted like fmt.Sprintf.
func Generic(format string, args ...any) *Error {
	return &Error{Class: GenericError, Desc: fmt.Sprintf(format, args...)}
}

// As returns the QMP error carried by err: the *Error in its chain, or a GenericError with
// err's text for any other error. It returns nil for a nil err.
func As(err error) *Error {
	if err == nil {
		return nil
	}
	var qe *Error
	if errors.As(err, &qe) {
		return qe
	}
	return &Error{Class: GenericError, Desc: err.Error()}
}
