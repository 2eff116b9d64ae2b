# migvisor: `make run` starts the daemon on its default machine, `make test` runs every test.
GO      ?= go
SOCK    ?= /tmp/migvisor.sock
FUZZTIME ?= 20s

.PHONY: all build run test vet fmt-check fuzz bench clean

all: build

build:
	$(GO) build -o bin/ ./cmd/...

# The default machine: two vCPUs on KVM (software backend where /dev/kvm is unusable) with a
# 4096-entry dirty ring, one writing and one reading, QMP on $(SOCK).
run: build
	bin/migvisor -accel kvm:soft,dirty-ring-size=4096 -smp 2 -m 1G \
		-workload cpus=0,mode=write -workload cpus=1,mode=read \
		-qmp unix:$(SOCK),server=on,wait=off

test: fmt-check vet
	$(GO) test -race -count=1 -timeout 15m ./...
	$(MAKE) fuzz

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

# Each fuzz target runs for a bounded time on top of its seed corpus (which `go test` always runs):
# the QMP server's input and the migration stream's destination (whose inputs, pages long, would
# spend the time being minimized: 60 s each by default).
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzServerInput$$' -fuzztime $(FUZZTIME) ./qmp/
	$(GO) test -run '^$$' -fuzz '^FuzzStreamDecoder$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 1000x ./migration/

bench:
	$(GO) test -run '^$$' -bench . -benchtime 2s ./...

clean:
	rm -rf bin
