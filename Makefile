# crmpay — PGXS build, plus the project's own targets:
#   make deps   install what a fresh Debian 12 machine lacks (quick when all is there)
#   make demo   the one-time payment flow, end to end, on a throwaway cluster and loopback gateway doubles
#   make test   deps, build, install, pg_regress on a private preloaded cluster, then the integration tests
#   make fuzz   libFuzzer harnesses over the C parsers (clang, ASan, UBSan), bounded time each
#   make bench  the benchmarks in bench/ (ratios measured in one run)

EXTENSION  = crmpay
EXTVERSION = 1.0
MODULE_big = crmpay
OBJS       = $(patsubst %.c,%.o,$(sort $(wildcard extension/*.c)))
# The install script is assembled from one part per concern (extension/sql/,
# in name order); upgrade scripts crmpay--X--Y.sql are shipped as they are.
DATA_built = extension/crmpay--$(EXTVERSION).sql
DATA       = $(sort $(wildcard extension/crmpay--*--*.sql))
PGFILEDESC = "crmpay - payment gateways inside PostgreSQL"

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PG_CPPFLAGS = -Iextension -std=gnu11 -Wall -Wextra -Werror \
              -Wno-unused-parameter -Wno-sign-compare -Wno-missing-field-initializers
SHLIB_LINK = -lcurl -lcrypto

# No LLVM bitcode for JIT inlining: it would need clang for an ordinary build.
override with_llvm = no

PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
ifneq ($(wildcard $(PGXS)),)
include $(PGXS)
else
all install:
	@echo "PGXS not found: run 'make deps' first (installs postgresql-server-dev-15)" >&2; exit 1
endif

# PGXS does not track headers: rebuild every object when any header changes
# (a stale object compiled against an older struct layout corrupts memory).
$(OBJS): $(wildcard extension/*.h)

extension/crmpay--$(EXTVERSION).sql: $(sort $(wildcard extension/sql/*.sql))
	cat $^ > $@

.PHONY: deps test demo fuzz bench check-clang regress integration

deps:
	@bash scripts/deps.sh

# Build with clang too: the code must be warning-free under both compilers.
# (The COPT flags only silence clang's complaints about gcc-only flags that
# PGXS passes and about PostgreSQL's own headers, not about our code.)
check-clang:
	@$(MAKE) --no-print-directory -s clean >/dev/null
	$(MAKE) --no-print-directory CC=clang \
	  COPT="-Wno-ignored-optimization-argument -Wno-unknown-warning-option -Wno-ignored-attributes" all
	@$(MAKE) --no-print-directory -s clean >/dev/null

test: deps
	$(MAKE) --no-print-directory check-clang
	$(MAKE) --no-print-directory all
	$(MAKE) --no-print-directory install
	bash tests/run_all.sh

regress: all
	bash tests/run_all.sh regress

integration: all
	bash tests/run_all.sh integration

demo: deps
	$(MAKE) --no-print-directory all
	$(MAKE) --no-print-directory install
	bash scripts/demo.sh

fuzz: deps
	bash tests/fuzz/run.sh

bench: deps
	$(MAKE) --no-print-directory all
	$(MAKE) --no-print-directory install
	bash bench/run.sh
