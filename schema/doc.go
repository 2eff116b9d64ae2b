// Package schema is migvisor's QAPI schema: the one definition of every QMP command it
// serves, their arguments and results, and its events, written as QAPI-style JSON in
// qapi/*.json (one file per area) and embedded in the binary.
//
// The qmp package consumes it through its Catalog interface:
//
//	s := schema.Default()
//	s.Exists("migrate")                             // is it a command?
//	s.AllowOOB("migrate-pause")                     // may it run with exec-oob?
//	args, err := s.Validate("migrate", rawArgs)     // QEMU's argument errors, as *qerr.Error
//	json.Unmarshal(args, &handlerArgs)              // normalised: uint64s already unsigned
//	s.CommandNames()                                // query-commands
//	s.Introspect()                                  // query-qmp-schema
//
// Validate reproduces QEMU 10's QAPI input visitor: member order, the texts of every
// argument error and the paths they name, and QEMU's number rules (an integer literal is
// int64, else uint64, else a double; uint64 members take negative integers and wrap them).
// Introspect reproduces QEMU's SchemaInfo list, with QEMU's numbering of hidden type names.
//
// Definition syntax follows QEMU's qapi/*.json in strict JSON: enum, struct (with an
// optional base), union (a base with a discriminator and object branches), alternate,
// command (data inline or a struct name, returns, allow-oob) and event; "*name" marks an
// optional member, ["T"] a list, {"type": T, "features": [...]} a member with features.
package schema
