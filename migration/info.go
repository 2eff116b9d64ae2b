package migration

import "time"

// Migration status values (MigrationStatus) that migvisor goes through.
const (
	StatusNone       = "none"
	StatusSetup      = "setup"
	StatusActive     = "active"
	StatusCancelling = "cancelling"
	StatusCancelled  = "cancelled"
	StatusDevice     = "device"
	// StatusPreSwitchover: stopped before the switch-over, waiting for migrate-continue
	// (pause-before-switchover).
	StatusPreSwitchover = "pre-switchover"
	StatusCompleted     = "completed"
	StatusFailed        = "failed"
)

// MigrationInfo is query-migrate's reply; members are present as QEMU fills them per state.
type MigrationInfo struct {
	Status                         string          `json:"status,omitempty"`
	RAM                            *MigrationStats `json:"ram,omitempty"`
	TotalTime                      *int64          `json:"total-time,omitempty"`
	ExpectedDowntime               *int64          `json:"expected-downtime,omitempty"`
	Downtime                       *int64          `json:"downtime,omitempty"`
	SetupTime                      *int64          `json:"setup-time,omitempty"`
	CPUThrottlePercentage          *int64          `json:"cpu-throttle-percentage,omitempty"`
	ErrorDesc                      string          `json:"error-desc,omitempty"`
	SocketAddress                  []SocketAddress `json:"socket-address,omitempty"`
	DirtyLimitThrottleTimePerRound *uint64         `json:"dirty-limit-throttle-time-per-round,omitempty"`
	DirtyLimitRingFullTime         *uint64         `json:"dirty-limit-ring-full-time,omitempty"`
}

// MigrationStats is MigrationInfo's "ram".
type MigrationStats struct {
	Transferred             int64   `json:"transferred"`
	Remaining               int64   `json:"remaining"`
	Total                   int64   `json:"total"`
	Duplicate               int64   `json:"duplicate"`
	Normal                  int64   `json:"normal"`
	NormalBytes             int64   `json:"normal-bytes"`
	DirtyPagesRate          int64   `json:"dirty-pages-rate"`
	Mbps                    float64 `json:"mbps"`
	DirtySyncCount          int64   `json:"dirty-sync-count"`
	PostcopyRequests        int64   `json:"postcopy-requests"`
	PageSize                int64   `json:"page-size"`
	MultifdBytes            uint64  `json:"multifd-bytes"`
	PagesPerSecond          uint64  `json:"pages-per-second"`
	PrecopyBytes            uint64  `json:"precopy-bytes"`
	DowntimeBytes           uint64  `json:"downtime-bytes"`
	PostcopyBytes           uint64  `json:"postcopy-bytes"`
	DirtySyncMissedZeroCopy uint64  `json:"dirty-sync-missed-zero-copy"`
}

// SocketAddress is QEMU's SocketAddress (the flat form query-migrate uses).
type SocketAddress struct {
	Type string `json:"type"`
	Path string `json:"path,omitempty"`
	Host string `json:"host,omitempty"`
	Port string `json:"port,omitempty"`
}

func ptr[T any](v T) *T { return &v }

// fill is fill_source_migration_info: what each state shows.
func (r *sourceRun) fill(info *MigrationInfo, dlOn bool, l DirtyLimiter) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.state {
	case StatusSetup:
		info.Status = r.state
	case StatusActive, StatusCancelling, StatusPreSwitchover, StatusDevice, StatusCompleted:
		info.Status = r.state
		info.SetupTime = ptr(r.setupTime)
		if r.state == StatusCompleted {
			info.TotalTime = ptr(r.totalTime)
			info.Downtime = ptr(r.downtime)
		} else {
			info.TotalTime = ptr(time.Since(r.start).Milliseconds())
			info.ExpectedDowntime = ptr(r.expected)
		}
		st := r.stats
		info.RAM = &st
		if r.throttlePct != 0 {
			info.CPUThrottlePercentage = ptr(r.throttlePct)
		}
		if dlOn && l.InService() {
			info.DirtyLimitThrottleTimePerRound = ptr(l.ThrottleTimePerRound())
			info.DirtyLimitRingFullTime = ptr(l.RingFullTime())
		}
	case StatusFailed, StatusCancelled:
		info.Status = r.state
		info.ErrorDesc = r.errDesc
	}
}
