package migration

import (
	"encoding/json"
	"math/bits"
	"slices"

	"github.com/migvisor/migvisor/qerr"
)

// Capabilities in QEMU 10's enum order (query-migrate-capabilities lists them so).
var capabilityNames = []string{
	"xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo",
	"release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
	"postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
	"background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit",
	"mapped-ram",
}

// supportedCapabilities may be turned on. zero-blocks and late-block-activate concern block
// devices, which migvisor has none of, so they are accepted and do nothing. return-path is
// how migvisor always talks on sockets (the destination's verdict fails the source, as QEMU's
// return path does), whichever its state; libvirt turns it off only for tunnelled migration,
// whose pipes carry no return path here either. pause-before-switchover is libvirt's
// stop before the switch-over.
var supportedCapabilities = map[string]bool{
	"auto-converge": true, "events": true, "dirty-limit": true,
	"return-path": true, "zero-blocks": true, "late-block-activate": true,
	"pause-before-switchover": true,
}

// capabilityRefusals are QEMU's own words for a capability it cannot use; the others that
// migvisor does not implement get errUnsupportedCapability.
var capabilityRefusals = map[string]*qerr.Error{
	"x-colo":       errNoCOLO,
	"postcopy-ram": errNoPostcopy,
}

// backgroundSnapshotIncompatible are the capabilities QEMU refuses beside background-snapshot.
var backgroundSnapshotIncompatible = []string{
	"postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "return-path",
	"multifd", "pause-before-switchover", "auto-converge", "release-ram", "rdma-pin-all",
	"xbzrle", "x-colo", "validate-uuid", "zero-copy-send",
}

// CapabilityState is one entry of migrate-set-capabilities / query-migrate-capabilities.
type CapabilityState struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

// Capabilities is the set that is on.
type Capabilities map[string]bool

func (c Capabilities) clone() Capabilities {
	n := make(Capabilities, len(c))
	for k, v := range c {
		if v {
			n[k] = true
		}
	}
	return n
}

// checkCapabilities applies QEMU's requirement and conflict rules to the merged set, then
// refuses what migvisor cannot do.
func checkCapabilities(c Capabilities, dirtyRing bool) error {
	if c["postcopy-ram"] && c["multifd"] {
		return errPostcopyMultifd
	}
	if c["background-snapshot"] {
		for _, other := range backgroundSnapshotIncompatible {
			if c[other] {
				return errBackgroundSnapshot(other)
			}
		}
	}
	if c["zero-copy-send"] && !c["multifd"] {
		return errZeroCopy
	}
	if c["switchover-ack"] && !c["return-path"] {
		return errSwitchoverAck
	}
	if c["dirty-limit"] {
		if c["auto-converge"] {
			return errDirtyLimitAutoConverge
		}
		if !dirtyRing {
			return errDirtyLimitNeedsRing
		}
	}
	if c["multifd"] && c["xbzrle"] {
		return errMultifdXbzrle
	}
	if c["mapped-ram"] {
		if c["xbzrle"] {
			return errMappedRAMXbzrle
		}
		if c["postcopy-ram"] {
			return errMappedRAMPostcopy
		}
	}
	if c["postcopy-preempt"] && !c["postcopy-ram"] {
		return errPreemptNeedsPostcopy
	}
	for _, name := range capabilityNames {
		if c[name] && !supportedCapabilities[name] {
			if err := capabilityRefusals[name]; err != nil {
				return err
			}
			return errUnsupportedCapability(name)
		}
	}
	return nil
}

// Parameters is MigrationParameters as query-migrate-parameters returns it.
type Parameters struct {
	AnnounceInitial          uint64          `json:"announce-initial"`
	AnnounceMax              uint64          `json:"announce-max"`
	AnnounceRounds           uint64          `json:"announce-rounds"`
	AnnounceStep             uint64          `json:"announce-step"`
	ThrottleTriggerThreshold uint64          `json:"throttle-trigger-threshold"`
	CPUThrottleInitial       uint64          `json:"cpu-throttle-initial"`
	CPUThrottleIncrement     uint64          `json:"cpu-throttle-increment"`
	CPUThrottleTailslow      bool            `json:"cpu-throttle-tailslow"`
	TLSCreds                 string          `json:"tls-creds"`
	TLSHostname              string          `json:"tls-hostname"`
	TLSAuthz                 string          `json:"tls-authz"`
	MaxBandwidth             uint64          `json:"max-bandwidth"`
	AvailSwitchoverBandwidth uint64          `json:"avail-switchover-bandwidth"`
	DowntimeLimit            uint64          `json:"downtime-limit"`
	XCheckpointDelay         uint64          `json:"x-checkpoint-delay"`
	MultifdChannels          uint64          `json:"multifd-channels"`
	XbzrleCacheSize          uint64          `json:"xbzrle-cache-size"`
	MaxPostcopyBandwidth     uint64          `json:"max-postcopy-bandwidth"`
	MaxCPUThrottle           uint64          `json:"max-cpu-throttle"`
	MultifdCompression       string          `json:"multifd-compression"`
	MultifdZlibLevel         uint64          `json:"multifd-zlib-level"`
	MultifdQatzipLevel       uint64          `json:"multifd-qatzip-level"`
	MultifdZstdLevel         uint64          `json:"multifd-zstd-level"`
	BlockBitmapMapping       json.RawMessage `json:"block-bitmap-mapping,omitempty"`
	XVCPUDirtyLimitPeriod    uint64          `json:"x-vcpu-dirty-limit-period"`
	VCPUDirtyLimit           uint64          `json:"vcpu-dirty-limit"`
	Mode                     string          `json:"mode"`
	ZeroPageDetection        string          `json:"zero-page-detection"`
	DirectIO                 bool            `json:"direct-io"`
}

// DefaultParameters are QEMU 10's defaults (migration/options.c).
func DefaultParameters() Parameters {
	return Parameters{
		AnnounceInitial: 50, AnnounceMax: 550, AnnounceRounds: 5, AnnounceStep: 100,
		ThrottleTriggerThreshold: 50, CPUThrottleInitial: 20, CPUThrottleIncrement: 10,
		MaxBandwidth: 128 << 20, DowntimeLimit: 300, XCheckpointDelay: 20000,
		MultifdChannels: 2, XbzrleCacheSize: 64 << 20, MaxCPUThrottle: 99,
		MultifdCompression: "none", MultifdZlibLevel: 1, MultifdQatzipLevel: 1, MultifdZstdLevel: 1,
		XVCPUDirtyLimitPeriod: 1000, VCPUDirtyLimit: 1, Mode: "normal", ZeroPageDetection: "multifd",
	}
}

// StrOrNull is QAPI's StrOrNull: a string, or null (which resets to "").
type StrOrNull struct {
	Set   bool
	Value string
}

// UnmarshalJSON accepts a string or null.
func (s *StrOrNull) UnmarshalJSON(b []byte) error {
	s.Set = true
	if string(b) == "null" {
		s.Value = ""
		return nil
	}
	return json.Unmarshal(b, &s.Value)
}

// SetParameters is migrate-set-parameters' argument: only the members present are set.
// Integers arrive as the schema normalised them (negative uint64 wrapped).
type SetParameters struct {
	AnnounceInitial          *uint64         `json:"announce-initial"`
	AnnounceMax              *uint64         `json:"announce-max"`
	AnnounceRounds           *uint64         `json:"announce-rounds"`
	AnnounceStep             *uint64         `json:"announce-step"`
	ThrottleTriggerThreshold *uint64         `json:"throttle-trigger-threshold"`
	CPUThrottleInitial       *uint64         `json:"cpu-throttle-initial"`
	CPUThrottleIncrement     *uint64         `json:"cpu-throttle-increment"`
	CPUThrottleTailslow      *bool           `json:"cpu-throttle-tailslow"`
	TLSCreds                 StrOrNull       `json:"tls-creds"`
	TLSHostname              StrOrNull       `json:"tls-hostname"`
	TLSAuthz                 StrOrNull       `json:"tls-authz"`
	MaxBandwidth             *uint64         `json:"max-bandwidth"`
	AvailSwitchoverBandwidth *uint64         `json:"avail-switchover-bandwidth"`
	DowntimeLimit            *uint64         `json:"downtime-limit"`
	XCheckpointDelay         *uint64         `json:"x-checkpoint-delay"`
	MultifdChannels          *uint64         `json:"multifd-channels"`
	XbzrleCacheSize          *uint64         `json:"xbzrle-cache-size"`
	MaxPostcopyBandwidth     *uint64         `json:"max-postcopy-bandwidth"`
	MaxCPUThrottle           *uint64         `json:"max-cpu-throttle"`
	MultifdCompression       *string         `json:"multifd-compression"`
	MultifdZlibLevel         *uint64         `json:"multifd-zlib-level"`
	MultifdQatzipLevel       *uint64         `json:"multifd-qatzip-level"`
	MultifdZstdLevel         *uint64         `json:"multifd-zstd-level"`
	BlockBitmapMapping       json.RawMessage `json:"block-bitmap-mapping"`
	XVCPUDirtyLimitPeriod    *uint64         `json:"x-vcpu-dirty-limit-period"`
	VCPUDirtyLimit           *uint64         `json:"vcpu-dirty-limit"`
	Mode                     *string         `json:"mode"`
	ZeroPageDetection        *string         `json:"zero-page-detection"`
	DirectIO                 *bool           `json:"direct-io"`
}

func setIf[T any](dst *T, v *T) {
	if v != nil {
		*dst = *v
	}
}

// merge returns p with the members present in s applied.
func (p Parameters) merge(s *SetParameters) Parameters {
	setIf(&p.AnnounceInitial, s.AnnounceInitial)
	setIf(&p.AnnounceMax, s.AnnounceMax)
	setIf(&p.AnnounceRounds, s.AnnounceRounds)
	setIf(&p.AnnounceStep, s.AnnounceStep)
	setIf(&p.ThrottleTriggerThreshold, s.ThrottleTriggerThreshold)
	setIf(&p.CPUThrottleInitial, s.CPUThrottleInitial)
	setIf(&p.CPUThrottleIncrement, s.CPUThrottleIncrement)
	setIf(&p.CPUThrottleTailslow, s.CPUThrottleTailslow)
	if s.TLSCreds.Set {
		p.TLSCreds = s.TLSCreds.Value
	}
	if s.TLSHostname.Set {
		p.TLSHostname = s.TLSHostname.Value
	}
	if s.TLSAuthz.Set {
		p.TLSAuthz = s.TLSAuthz.Value
	}
	setIf(&p.MaxBandwidth, s.MaxBandwidth)
	setIf(&p.AvailSwitchoverBandwidth, s.AvailSwitchoverBandwidth)
	setIf(&p.DowntimeLimit, s.DowntimeLimit)
	setIf(&p.XCheckpointDelay, s.XCheckpointDelay)
	setIf(&p.MultifdChannels, s.MultifdChannels)
	setIf(&p.XbzrleCacheSize, s.XbzrleCacheSize)
	setIf(&p.MaxPostcopyBandwidth, s.MaxPostcopyBandwidth)
	setIf(&p.MaxCPUThrottle, s.MaxCPUThrottle)
	setIf(&p.MultifdCompression, s.MultifdCompression)
	setIf(&p.MultifdZlibLevel, s.MultifdZlibLevel)
	setIf(&p.MultifdQatzipLevel, s.MultifdQatzipLevel)
	setIf(&p.MultifdZstdLevel, s.MultifdZstdLevel)
	if s.BlockBitmapMapping != nil {
		p.BlockBitmapMapping = slices.Clone(s.BlockBitmapMapping)
	}
	setIf(&p.XVCPUDirtyLimitPeriod, s.XVCPUDirtyLimitPeriod)
	setIf(&p.VCPUDirtyLimit, s.VCPUDirtyLimit)
	setIf(&p.Mode, s.Mode)
	setIf(&p.ZeroPageDetection, s.ZeroPageDetection)
	setIf(&p.DirectIO, s.DirectIO)
	return p
}

// check is migrate_params_check on the merged set, in QEMU's order, first failure wins.
func (p *Parameters) check() *qerr.Error {
	switch {
	case p.ThrottleTriggerThreshold < 1 || p.ThrottleTriggerThreshold > 100:
		return errParam("throttle_trigger_threshold", "an integer in the range of 1 to 100")
	case p.CPUThrottleInitial < 1 || p.CPUThrottleInitial > 99:
		return errParam("cpu_throttle_initial", "an integer in the range of 1 to 99")
	case p.CPUThrottleIncrement < 1 || p.CPUThrottleIncrement > 99:
		return errParam("cpu_throttle_increment", "an integer in the range of 1 to 99")
	case p.DowntimeLimit > 2000*1000:
		return errParam("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
	case p.MultifdChannels < 1 || p.MultifdChannels > 255:
		return errParam("multifd_channels", "a value between 1 and 255")
	case p.MultifdZlibLevel > 9:
		return errParam("multifd_zlib_level", "a value between 0 and 9")
	case p.MultifdQatzipLevel < 1 || p.MultifdQatzipLevel > 9:
		return errParam("multifd_qatzip_level", "a value between 1 and 9")
	case p.MultifdZstdLevel > 20:
		return errParam("multifd_zstd_level", "a value between 0 and 20")
	case p.XbzrleCacheSize < PageSize || bits.OnesCount64(p.XbzrleCacheSize) != 1:
		return errParam("xbzrle_cache_size", "a power of two no less than the target page size")
	case p.MaxCPUThrottle < p.CPUThrottleInitial || p.MaxCPUThrottle > 99:
		return errParam("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
	case p.AnnounceInitial > 100000:
		return errParam("announce_initial", "a value between 0 and 100000")
	case p.AnnounceMax > 100000:
		return errParam("announce_max", "a value between 0 and 100000")
	case p.AnnounceRounds > 1000:
		return errParam("announce_rounds", "a value between 0 and 1000")
	case p.AnnounceStep < 1 || p.AnnounceStep > 10000:
		return errParam("announce_step", "a value between 0 and 10000")
	case p.XVCPUDirtyLimitPeriod < 1 || p.XVCPUDirtyLimitPeriod > 1000:
		return errParam("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
	case p.VCPUDirtyLimit < 1:
		return errVCPUDirtyLimit
	}
	return nil
}

func (p *Parameters) clone() Parameters {
	c := *p
	c.BlockBitmapMapping = slices.Clone(p.BlockBitmapMapping)
	return c
}
