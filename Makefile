# sluice build. `make` builds the release binary; `make test` installs what is missing,
# builds release and sanitizer variants, and runs every test; `make run` starts the quickstart.
CC        ?= cc
FUZZ_CC   ?= clang
MODE      ?= release
BUILD     := build/$(MODE)
WARN      := -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wstrict-prototypes \
             -Wmissing-prototypes -Wvla -Wnull-dereference
BASE_CFLAGS := -std=c17 -D_GNU_SOURCE -Isrc -pthread $(WARN) -MMD -MP
LIBS      := -lyaml -lssl -lcrypto -ljansson -lhiredis -lcares -lzstd -lpthread -lm

ifeq ($(MODE),scan)
  OPT := -O0 -g
  LDSAN :=
else ifeq ($(MODE),asan)
  OPT := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
  LDSAN := -fsanitize=address,undefined
else
  OPT := -O2 -g
  LDSAN :=
endif
CFLAGS_ALL := $(BASE_CFLAGS) $(OPT) $(CFLAGS)

LIB_SRCS  := $(sort $(wildcard src/*/*.c))
LIB_OBJS  := $(LIB_SRCS:%.c=$(BUILD)/%.o)
UNIT_SRCS := $(sort $(wildcard tests/unit/test_*.c))
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)
FUZZ_SRCS := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BINS := $(FUZZ_SRCS:tests/fuzz/%.c=build/fuzz/%)
FUZZ_LIB_OBJS := $(LIB_SRCS:%.c=build/fuzz/obj/%.o)

# Keep fuzz objects: make would otherwise delete them as intermediates after each link.
.SECONDARY:

.PHONY: all deps run test unit unit-bins integration fuzz-build fuzz analyze clean format lint bench

all: $(BUILD)/sluice

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

$(BUILD)/libsluice.a: $(LIB_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/sluice: $(BUILD)/src/main.o $(BUILD)/libsluice.a
	$(CC) $(LDSAN) -pthread -o $@ $^ $(LIBS)

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libsluice.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -Itests/unit -o $@ $< $(BUILD)/libsluice.a $(LIBS) -lcmocka $(LDSAN)

# Measurement tools (bench/*.c with a `make bench` line in their header); never run by `make test`.
BENCH_BINS := $(BUILD)/bench/tls_idle_mem

$(BUILD)/bench/%: bench/%.c $(BUILD)/libsluice.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ $< $(BUILD)/libsluice.a $(LIBS) $(LDSAN)

bench: $(BENCH_BINS)

unit-bins: $(UNIT_BINS)

unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

integration: $(BUILD)/sluice
	SLUICE_BIN=$(CURDIR)/$(BUILD)/sluice /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration

build/fuzz/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c17 -D_GNU_SOURCE -Isrc -pthread -g -O1 -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all -c $< -o $@

build/fuzz/%: tests/fuzz/%.c $(FUZZ_LIB_OBJS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c17 -D_GNU_SOURCE -Isrc -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -o $@ $^ $(LIBS)

fuzz-build: $(FUZZ_BINS)

# Short bounded fuzz run of every target: replays regressions, then explores from the corpus.
FUZZ_SECONDS ?= 30
fuzz: fuzz-build
	@set -e; for f in $(FUZZ_BINS); do n=$$(basename $$f | sed 's/^fuzz_//'); \
	  echo "== fuzz $$n ($(FUZZ_SECONDS)s)"; mkdir -p build/fuzz/work/$$n; \
	  if [ -d tests/fuzz/regress/$$n ] && [ -n "$$(ls tests/fuzz/regress/$$n)" ]; then $$f tests/fuzz/regress/$$n/*; fi; \
	  dict=""; [ -f tests/fuzz/$$n.dict ] && dict="-dict=tests/fuzz/$$n.dict"; \
	  $$f $$dict -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 build/fuzz/work/$$n tests/fuzz/corpus/$$n; \
	done

deps:
	@scripts/install-deps.sh

run: deps
	@$(MAKE) --no-print-directory MODE=release all
	./build/release/sluice -c examples/quickstart.yaml

# The full suite: release build, unit + integration tests, then the same under ASan+UBSan,
# then a short fuzz run.
# Compiles in parallel (the tests themselves run one after another).
JOBS := $(shell nproc 2>/dev/null || echo 2)

test: deps
	@$(MAKE) --no-print-directory -j$(JOBS) MODE=release all unit-bins
	@$(MAKE) --no-print-directory MODE=release unit
	@$(MAKE) --no-print-directory MODE=release integration
	@$(MAKE) --no-print-directory -j$(JOBS) MODE=asan all unit-bins
	@$(MAKE) --no-print-directory MODE=asan unit
	@$(MAKE) --no-print-directory MODE=asan integration
	@$(MAKE) --no-print-directory -j$(JOBS) fuzz-build
	@$(MAKE) --no-print-directory fuzz
	@$(MAKE) --no-print-directory analyze
	@scripts/lint.sh

# Static analysis of the library and binary; any finding fails the build.
analyze:
	rm -rf build/scan
	scan-build --status-bugs -o build/scan-report $(MAKE) --no-print-directory -j$(JOBS) MODE=scan all

format:
	clang-format -i $$(git ls-files 'src/*.[ch]' 'tests/*.[ch]' 'bench/*.[ch]')

lint:
	@scripts/lint.sh

clean:
	rm -rf build

-include $(LIB_OBJS:.o=.d) $(BUILD)/src/main.d
