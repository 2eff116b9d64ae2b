package vmm

import (
	"math"
	"math/big"
	"strconv"
	"strings"

	"github.com/migvisor/migvisor/qerr"
	"github.com/migvisor/migvisor/vmm/guest"
)

// Ring sizes the machine accepts, in entries (KVM allows at most 1 MiB of 16-byte entries).
const (
	MinRingSize = 1024
	MaxRingSize = 65536
)

// ValidateRingSize checks a -accel dirty-ring-size value (entries; 0 means no ring).
func ValidateRingSize(n int) error {
	switch {
	case n == 0:
		return nil
	case n < 0 || n&(n-1) != 0:
		return qerr.Generic(errRingPowerOfTwo)
	case n > MaxRingSize:
		return errRingTooBig(n, MaxRingSize)
	case n < MinRingSize:
		return errRingEnable("Invalid argument")
	}
	return nil
}

// ParseSize parses a byte size the way QEMU's size options do: a decimal number (a fraction
// only with a unit), or 0x-prefixed hex, optionally followed by one of B, K, M, G, T, P, E
// (powers of 1024, any case). A plain number is bytes.
func ParseSize(s string) (uint64, error) { return parseSize(s, 'B', "size") }

// ParseMemSize parses the value of -m the way QEMU does: "size=" may prefix it, a number
// without unit is MiB ("512" is 512 MiB, "1G" is 1 GiB, "4096B" is 4 KiB), 0 means the default
// (returned as 0), and the result is rounded up to 8 KiB.
func ParseMemSize(s string) (uint64, error) {
	s = strings.TrimPrefix(s, "size=")
	if s == "" {
		return 0, qerr.Generic(errSizeMissing)
	}
	v, err := parseSize(s, 'M', "size")
	if err != nil {
		return 0, err
	}
	const align = 8192
	if v > math.MaxUint64-(align-1) {
		return 0, qerr.Generic(errSizeTooLarge)
	}
	return (v + align - 1) &^ (align - 1), nil
}

var sizeUnits = map[byte]uint{'B': 0, 'K': 10, 'M': 20, 'G': 30, 'T': 40, 'P': 50, 'E': 60}

func parseSize(s string, defUnit byte, param string) (uint64, error) {
	bad := errSize(param)
	num, unit := s, defUnit
	if n := len(s); n > 0 {
		if u := s[n-1] &^ 0x20; u >= 'A' && u <= 'Z' && !strings.HasPrefix(strings.ToLower(s), "0x") {
			if _, ok := sizeUnits[u]; !ok {
				return 0, bad
			}
			num, unit = s[:n-1], u
		}
	}
	if num == "" || num[0] == '-' || num[0] == '+' {
		return 0, bad
	}
	shift := sizeUnits[unit]
	if strings.HasPrefix(strings.ToLower(num), "0x") {
		v, err := strconv.ParseUint(num[2:], 16, 64)
		if err != nil || num[2:] == "" || (shift > 0 && v > math.MaxUint64>>shift) {
			return 0, bad
		}
		return v << shift, nil
	}
	// Exact decimal arithmetic: "1.5G" must give exactly 1.5 GiB.
	r, ok := new(big.Rat).SetString(num)
	if !ok || strings.ContainsAny(num, "eE/") {
		return 0, bad
	}
	if !r.IsInt() && shift == 0 {
		return 0, bad
	}
	r.Mul(r, new(big.Rat).SetInt(new(big.Int).Lsh(big.NewInt(1), shift)))
	v := new(big.Int).Quo(r.Num(), r.Denom())
	if !v.IsUint64() {
		return 0, bad
	}
	return v.Uint64(), nil
}

// Workload modes.
const (
	ModeIdle  = "idle"
	ModeWrite = "write"
	ModeRead  = "read"
)

// ParseWorkload parses a -workload value such as
// "cpus=0-1,mode=write,size=256M,rate=200M,bytes=8". cpus (required) takes an index, a range
// "a-b" or a colon list "0:2", and may repeat. mode is write (the default), read or idle; size
// is the region in bytes (0: the machine's default share); rate is in bytes of guest memory
// per second, each page touched counting 4096 (0: flat out); bytes is what a write stores in
// each page, a multiple of 4 (default 8). The caller checks the cpus against the machine.
func ParseWorkload(spec string) ([]int, Workload, error) {
	w := Workload{Mode: ModeWrite, BytesPerPage: guest.DefaultBytesPerPage}
	haveCPUs := false
	var cpus []int
	for _, kv := range strings.Split(spec, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || v == "" {
			if k == "" {
				continue
			}
			return nil, Workload{}, qerr.Generic("Parameter '%s' is missing a value", k)
		}
		var err error
		switch k {
		case "cpus":
			var c []int
			c, err = parseCPUList(v)
			cpus = append(cpus, c...)
			haveCPUs = true
		case "mode":
			if v != ModeWrite && v != ModeRead && v != ModeIdle {
				err = qerr.Generic("Parameter 'mode' does not accept value '%s'", v)
			}
			w.Mode = v
		case "size":
			w.Size, err = parseSize(v, 'B', k)
		case "rate":
			w.Rate, err = parseSize(v, 'B', k)
		case "bytes":
			var n uint64
			n, err = strconv.ParseUint(v, 10, 16)
			if err != nil || n < 4 || n > PageSize || n%4 != 0 {
				err = qerr.Generic("Parameter 'bytes' expects a multiple of 4 between 4 and %d", PageSize)
			}
			w.BytesPerPage = int(n)
		default:
			err = qerr.Generic("Invalid parameter '%s'", k)
		}
		if err != nil {
			return nil, Workload{}, err
		}
	}
	if !haveCPUs {
		return nil, Workload{}, qerr.Generic("Parameter 'cpus' is missing")
	}
	return cpus, w, nil
}

func parseCPUList(v string) ([]int, error) {
	var out []int
	for _, part := range strings.Split(v, ":") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err1 := strconv.ParseUint(lo, 10, 16)
		b := a
		var err2 error
		if isRange {
			b, err2 = strconv.ParseUint(hi, 10, 16)
		}
		if err1 != nil || err2 != nil || b < a {
			return nil, qerr.Generic("Parameter 'cpus' expects a CPU index, range or list")
		}
		for i := a; i <= b; i++ {
			out = append(out, int(i))
		}
	}
	return out, nil
}
