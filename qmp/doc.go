// Package qmp speaks QEMU's QMP exactly as QEMU 10 does, so that management tools written for
// QEMU cannot tell migvisor from it: the server side for the daemon, a client for tools and tests.
//
// Server: NewServer takes the command catalog (the QAPI schema, through the Catalog interface)
// and the version to report; Handle registers a handler per command; Serve runs on as many
// listeners as wanted. qmp_capabilities, query-version, query-commands and query-qmp-schema are
// built in.
//
//	srv := qmp.NewServer(schema.Default(), qmp.Version{Major: 10, Minor: 0, Micro: 2})
//	srv.Handle("stop", func(ctx context.Context, args json.RawMessage) (any, error) {
//		return nil, machine.Stop() // emits STOP through srv.Emit before the reply
//	})
//	go srv.Serve(unixListener)
//	defer srv.Close()
//
// What the wire sees follows QEMU: the input is read by a port of QEMU's JSON lexer, streamer
// and parser behaviour (single quotes, error texts, how much input an error swallows, limits);
// requests are checked in qmp_dispatch's order with its texts; output uses QEMU's separators,
// escapes, number formats and even its hash-table member order, each message ending in CRLF.
// In-band commands run one at a time across all clients, as under QEMU's big lock, and each
// client gets its replies in request order; exec-oob commands run at once. Events go to every
// client past negotiation; an event emitted by a handler precedes the handler's reply.
//
// Numbers are printed as QEMU holds them, so an id beyond a double's range comes back as inf
// or -inf, as from QEMU (which is not JSON).
//
// Descriptors: on a unix socket the server receives SCM_RIGHTS ancillary data with the input.
// getfd and closefd name and close them in the client's own table, which handlers reach with
// SessionFDs(ctx) (migrate fd:NAME takes its descriptor from it) and which closes with the
// session; add-fd, remove-fd and query-fdsets keep server-wide sets, as QEMU does. As in
// QEMU, a batch received replaces the unclaimed rest of the one before.
//
// Where QEMU's behaviour is not kept: several clients may connect at once (up to
// MaxSessions), where a QEMU socket serves one at a time.
//
// Client: Dial connects and negotiates; Execute matches replies by id and returns QMP errors
// as *qerr.Error; Events delivers events without ever blocking the connection.
package qmp
