package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/migvisor/migvisor/dirtylimit"
	"github.com/migvisor/migvisor/vmm"
)

// endpoint is one -qmp listener.
type endpoint struct {
	network string // "unix" or "tcp"
	addr    string
	wait    bool // wait=on: hold the machine until a client connects, as QEMU does
}

// config is what the command line asks for.
type config struct {
	qmp         []endpoint
	startPaused bool // -S
	name        string
	uuid        string
	memSize     uint64
	cpus        int
	accel       string // "kvm", "soft" or "kvm:soft", as given
	ringSize    int
	workloads   []vmm.Workload
	incoming    string
	// dirtyLimitAlgorithm is migvisor's extension -dirty-limit-algorithm: QEMU's exact
	// algorithm or migvisor's (the default), so that the two can be compared.
	dirtyLimitAlgorithm dirtylimit.Algorithm
	// checkAllMemory is migvisor's -memory-check all: a migration's source rereads all
	// populated memory at the stop, whatever the downtime (the default, budget, bounds it).
	checkAllMemory bool
	version        bool
	help           bool
}

const defaultMem = 512 << 20

const defaultUUID = "00000000-0000-0000-0000-000000000000"

// usage lists every option; -help prints it.
const usage = `usage: migvisor [options]

  -qmp unix:PATH,server=on,wait=off   serve QMP on a unix socket (repeatable)
  -qmp tcp:HOST:PORT,server=on,wait=off
                                      serve QMP on a TCP port (repeatable)
  -S                                  do not start the vCPUs (run state prelaunch)
  -name NAME                          the guest name (query-name)
  -uuid UUID                          the guest UUID (query-uuid)
  -m SIZE                             guest memory: MiB, or with a K/M/G/T suffix (default 512M)
  -smp N                              number of vCPUs (default 2)
  -accel kvm[,dirty-ring-size=N]      real KVM vCPUs; N entries per vCPU ring, a power of two in 1024..65536
  -accel soft[,dirty-ring-size=N]     the software backend (no /dev/kvm needed)
  -accel kvm:soft[,...]               KVM, falling back to soft when /dev/kvm is unusable
  -workload cpus=LIST,mode=write|read|idle[,size=SIZE][,rate=RATE][,bytes=N]
                                      what each vCPU runs (repeatable; default idle)
  -dirty-limit-algorithm migvisor|qemu
                                      how the dirty limit picks a vCPU's penalty (default migvisor)
  -memory-check budget|all            what a migration's source rereads at the stop: what the
                                      downtime budget allows (default), or all populated memory
  -incoming URI|defer                 wait for an incoming migration
  -version                            print the version and exit
  -help                               print this text and exit
`

// parseArgs reads QEMU-style options: a single dash, then a value for options that take one.
func parseArgs(args []string) (*config, error) {
	c := &config{memSize: defaultMem, cpus: 2, uuid: defaultUUID}
	var workloadSpecs []string
	for i := 0; i < len(args); i++ {
		opt := args[i]
		if !strings.HasPrefix(opt, "-") || opt == "-" {
			return nil, fmt.Errorf("%s: invalid option", opt)
		}
		name := strings.TrimPrefix(strings.TrimPrefix(opt, "-"), "-")
		takesValue := map[string]bool{"qmp": true, "name": true, "uuid": true, "m": true, "smp": true,
			"accel": true, "workload": true, "incoming": true, "dirty-limit-algorithm": true, "memory-check": true}
		flags := map[string]*bool{"S": &c.startPaused, "version": &c.version, "help": &c.help, "h": &c.help}
		if p, ok := flags[name]; ok {
			*p = true
			continue
		}
		if !takesValue[name] {
			return nil, fmt.Errorf("%s: invalid option", opt)
		}
		if i+1 >= len(args) {
			return nil, fmt.Errorf("%s: requires an argument", opt)
		}
		i++
		val := args[i]
		var err error
		switch name {
		case "qmp":
			var ep endpoint
			if ep, err = parseQMP(val); err == nil {
				c.qmp = append(c.qmp, ep)
			}
		case "name":
			c.name, err = parseName(val)
		case "uuid":
			if !validUUID(val) {
				err = fmt.Errorf("%s: invalid UUID", val)
			}
			c.uuid = strings.ToLower(val)
		case "m":
			c.memSize, err = parseMem(val)
		case "smp":
			c.cpus, err = parseSMP(val)
		case "accel":
			c.accel, c.ringSize, err = parseAccel(val)
		case "workload":
			workloadSpecs = append(workloadSpecs, val)
		case "incoming":
			c.incoming = val
		case "dirty-limit-algorithm":
			c.dirtyLimitAlgorithm, err = dirtylimit.ParseAlgorithm(val)
		case "memory-check":
			switch val {
			case "budget", "all":
				c.checkAllMemory = val == "all"
			default:
				err = errors.New("expected budget or all")
			}
		}
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", opt, val, err)
		}
	}
	// Only up to the last vCPU named: -smp is checked against the machine's limit later.
	for _, spec := range workloadSpecs {
		cpus, w, err := vmm.ParseWorkload(spec)
		if err != nil {
			return nil, fmt.Errorf("-workload %s: %w", spec, err)
		}
		for _, cpu := range cpus {
			if cpu < 0 || cpu >= c.cpus {
				return nil, fmt.Errorf("-workload %s: cpu %d out of range (the machine has %d vCPUs)", spec, cpu, c.cpus)
			}
			if cpu >= len(c.workloads) {
				c.workloads = append(c.workloads, make([]vmm.Workload, cpu+1-len(c.workloads))...)
			}
			c.workloads[cpu] = w
		}
	}
	return c, nil
}

// keyval splits QEMU's "first,key=value,key=value" syntax; ",," stands for a literal comma.
func keyval(s string) (first string, kv map[string]string, err error) {
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	parts = append(parts, cur.String())
	kv = map[string]string{}
	for i, p := range parts {
		k, v, hasEq := strings.Cut(p, "=")
		if i == 0 && !hasEq {
			first = p
			continue
		}
		if !hasEq {
			// QEMU's legacy boolean forms: "server", "nowait".
			v = "on"
			if strings.HasPrefix(k, "no") {
				k, v = strings.TrimPrefix(k, "no"), "off"
			}
		}
		if k == "" {
			return "", nil, errors.New("empty parameter name")
		}
		if _, dup := kv[k]; dup {
			return "", nil, fmt.Errorf("parameter '%s' given twice", k)
		}
		kv[k] = v
	}
	return first, kv, nil
}

func parseBool(key, v string) (bool, error) {
	switch v {
	case "on", "yes", "true", "y":
		return true, nil
	case "off", "no", "false", "n":
		return false, nil
	}
	return false, fmt.Errorf("parameter '%s' expects 'on' or 'off'", key)
}

func parseQMP(s string) (endpoint, error) {
	addr, kv, err := keyval(s)
	if err != nil {
		return endpoint{}, err
	}
	server, wait := false, true // QEMU's defaults: a client socket; a server waits for its first client
	for k, v := range kv {
		switch k {
		case "server":
			server, err = parseBool(k, v)
		case "wait":
			wait, err = parseBool(k, v)
		default:
			err = fmt.Errorf("invalid parameter '%s'", k)
		}
		if err != nil {
			return endpoint{}, err
		}
	}
	if !server {
		return endpoint{}, errors.New("only server=on is supported: migvisor listens, it does not connect out")
	}
	scheme, rest, ok := strings.Cut(addr, ":")
	if !ok || rest == "" {
		return endpoint{}, fmt.Errorf("'%s' is not a valid char driver address (want unix:PATH or tcp:HOST:PORT)", addr)
	}
	switch scheme {
	case "unix":
		return endpoint{network: "unix", addr: rest, wait: wait}, nil
	case "tcp":
		if _, _, err := net.SplitHostPort(rest); err != nil {
			return endpoint{}, fmt.Errorf("'%s': %v", rest, err)
		}
		return endpoint{network: "tcp", addr: rest, wait: wait}, nil
	}
	return endpoint{}, fmt.Errorf("'%s' is not a supported char driver (want unix or tcp)", scheme)
}

func parseName(s string) (string, error) {
	first, kv, err := keyval(s)
	if err != nil {
		return "", err
	}
	if g, ok := kv["guest"]; ok {
		first = g
		delete(kv, "guest")
	}
	for k := range kv {
		if k != "process" && k != "debug-threads" {
			return "", fmt.Errorf("invalid parameter '%s'", k)
		}
	}
	return first, nil
}

func validUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, r := range s {
		switch i {
		case 8, 13, 18, 23:
			if r != '-' {
				return false
			}
		default:
			if !strings.ContainsRune("0123456789abcdefABCDEF", r) {
				return false
			}
		}
	}
	return true
}

// parseMem follows QEMU's -m: vmm.ParseMemSize reads the size; slots and maxmem (memory
// hotplug) do not exist here.
func parseMem(s string) (uint64, error) {
	if strings.ContainsRune(s, ',') {
		return 0, errors.New("only a size is supported (no slots or maxmem: there is no memory hotplug)")
	}
	n, err := vmm.ParseMemSize(s)
	if err != nil {
		return 0, err
	}
	if n == 0 {
		n = defaultMem
	}
	return n, nil
}

func parseSMP(s string) (int, error) {
	first, kv, err := keyval(s)
	if err != nil {
		return 0, err
	}
	if v, ok := kv["cpus"]; ok {
		first = v
		delete(kv, "cpus")
	}
	if v, ok := kv["maxcpus"]; ok && v != first {
		return 0, errors.New("maxcpus other than cpus is not supported (no CPU hotplug)")
	}
	delete(kv, "maxcpus")
	for k := range kv {
		return 0, fmt.Errorf("invalid parameter '%s'", k)
	}
	// The most the machine takes depends on the accelerator: vmm.New says.
	n, err := strconv.Atoi(first)
	if err != nil || n < 1 {
		return 0, fmt.Errorf("invalid number of CPUs '%s'", first)
	}
	return n, nil
}

func parseAccel(s string) (accel string, ring int, err error) {
	first, kv, err := keyval(s)
	if err != nil {
		return "", 0, err
	}
	switch first {
	case "kvm", "soft", "kvm:soft":
	default:
		return "", 0, fmt.Errorf("invalid accelerator %s (want kvm, soft or kvm:soft)", first)
	}
	for k, v := range kv {
		if k != "dirty-ring-size" {
			return "", 0, fmt.Errorf("invalid parameter '%s'", k)
		}
		n, perr := strconv.ParseUint(v, 10, 32)
		if perr != nil {
			return "", 0, fmt.Errorf("Parameter 'dirty-ring-size' expects uint32_t")
		}
		ring = int(n)
	}
	if err := vmm.ValidateRingSize(ring); err != nil {
		return "", 0, err
	}
	return first, ring, nil
}

// resolveAccel decides the backend: "kvm" needs /dev/kvm, "kvm:soft" and the default fall back to
// the software backend with one warning line.
func resolveAccel(asked string, kvmErr error, warn func(string)) (string, error) {
	switch asked {
	case "soft":
		return "soft", nil
	case "kvm":
		if kvmErr != nil {
			return "", fmt.Errorf("-accel kvm: %v", kvmErr)
		}
		return "kvm", nil
	}
	if kvmErr == nil {
		return "kvm", nil
	}
	warn(fmt.Sprintf("warning: KVM is not usable (%v); falling back to -accel soft", kvmErr))
	return "soft", nil
}

func printUsage() { fmt.Fprint(os.Stdout, usage) }
