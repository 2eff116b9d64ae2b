// Package unixsock creates unix listening sockets that are never reachable with a mode other
// than the one asked for: the socket is bound in a private (0700) directory beside its path,
// given its mode there, and renamed into place without replacing anything. A chmod after
// bind would leave a window in which, under a permissive umask, any user could connect.
//
//	l, err := unixsock.Listen("/run/migvisor/qmp.sock", 0o600)
//
// A path longer than a sockaddr_un holds is a *PathTooLongError; an existing file of any kind
// at the path is left alone and Listen fails with EADDRINUSE. Closing the listener removes
// the socket if it is still the one Listen created.
package unixsock
