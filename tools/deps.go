//go:build tools

// Package tools pins module dependencies that the packages below start importing soon.
package tools

import (
	_ "github.com/digitalocean/go-qemu/qmp"
	_ "github.com/stretchr/testify/require"
	_ "golang.org/x/arch/x86/x86asm"
	_ "golang.org/x/sys/unix"
)
