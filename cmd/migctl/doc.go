// Command migctl is a client of migvisor's QMP socket, and nothing else: it never imports the
// machine or migration packages. `migctl SOCKET COMMAND [key=value ...]` runs one command and
// prints its reply as indented JSON.
package main
