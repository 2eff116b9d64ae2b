// Package controller runs a whole live migration between two QEMU-compatible endpoints (two
// migvisor daemons, two QEMU processes) as a QMP client of both: it never imports the engine.
//
//	src, _ := qmp.Dial(ctx, "unix", "/tmp/src.sock")
//	dst, _ := qmp.Dial(ctx, "unix", "/tmp/dst.sock") // started with -incoming defer
//	sum, err := controller.Run(ctx, src, dst, controller.Config{URI: "unix:/tmp/mig.sock",
//		Bandwidth: 128 << 20, Downtime: 300 * time.Millisecond, Policy: controller.PolicyAuto})
//
// Run works in four steps, each logged as an Action with its time and reason:
//
//   - Probe (probe.go): what the source offers: its migration capabilities, whether it has a
//     dirty ring (calc-dirty-rate accepts mode dirty-ring), whether set-vcpu-dirty-limit is
//     accepted, its vCPUs, memory and x-query-workload.
//   - Measure and plan (plan.go, pure): per-vCPU dirty rates (dirty-ring mode where there is a
//     ring, the whole guest's otherwise) against the bandwidth and the downtime. Plain precopy
//     when the predicted passes converge; otherwise a dirty limit on the vCPUs that dirty
//     (readers untouched) so that the sum fits the link; auto-converge only where there is no
//     ring, with its initial throttle set to what the measured rate needs.
//   - Run and escalate (escalate.go, pure): query-migrate samples and MIGRATION_PASS events
//     feed an Escalator. A stall as KubeVirt defines it (remaining bytes have not gone below
//     their lowest for the progress timeout) tightens the limits; the downtime limit steps up
//     toward Config.Downtime as Nova's downtime steps do; at the completion timeout (per GiB
//     of guest memory, as KubeVirt and Nova count it) it cancels or pauses the source.
//   - Restore (restore.go): whatever happens (completion, failure, timeout, ctx cancelled,
//     which cancels the migration first) the capabilities, parameters and per-vCPU dirty
//     limits it changed are put back on both ends; limits the user had set are given back.
//
// The dirty limit is applied with set-vcpu-dirty-limit per vCPU, not with the dirty-limit
// capability (which limits every vCPU alike, readers too).
package controller
