# mqtt-pingpong: a thin front for the commands CI and people run.
#   make run    set up .venv, start the three programs under supervisord, stream their logs;
#               Ctrl-C stops everything.
#   make test   set up .venv, then ruff, mypy and pytest.
#   make test-pythons   pytest once per supported Python (3.11, 3.12, 3.13), each in .venv-X.Y.
#   make cluster  the two clients across a two-node RabbitMQ cluster; Ctrl-C stops everything.

PYTHON ?= python3
# := so that only the command line (make test-pythons passes VENV=.venv-3.12) overrides it: make
# exports command-line variables to its recipes, and a test's own `make run` must not inherit it.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The optional extra that draws pictures (matplotlib), for make report and make bench only.
REPORT_STAMP := $(VENV)/.report-stamp
CONF   := supervisord.conf
# The extras installed with the package. CI adds `report` (matplotlib) so that the test of the
# pictures draws one; `make run` and `make test` stay without it.
EXTRAS ?= dev
# The live page's MQTT client (MQTT.js, from the npm registry), installed into web/node_modules.
WEB_STAMP := web/node_modules/.installed-stamp

.PHONY: help venv web web-if-npm bytecode run start stop status reload logs cluster report test test-pythons lint typecheck pytest bench bench-full bench-cluster soak add-user clean

help:
	@echo "make run | start | stop | status | reload | logs | web | cluster | report | test | test-pythons | bench | soak | add-user NAME=x | clean"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mqtt-pingpong needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)

$(REPORT_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,report]'
	@touch $(REPORT_STAMP)

# Compile the programs' bytecode ahead of time. Python skips writing it where
# PYTHONDONTWRITEBYTECODE is set (as on our CI machines), and then compiles every module at every
# start: about 10 % of the broker's start-up. Up-to-date files are skipped; a stale file is
# never used (Python checks each source's mtime and size).
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q broker common ping_client echo_client cluster

run: bytecode web-if-npm
	@bash tools/run.sh

start: bytecode web-if-npm
	@bash tools/run.sh --start-only

# MQTT.js for the live page (make run serves it at http://127.0.0.1:10080/). Optional for make
# run: without npm, or offline, the broker still speaks MQTT over WebSockets and the page says
# what to run. make test needs it (the browser test).
web: $(WEB_STAMP)

$(WEB_STAMP): web/package.json
	@command -v npm >/dev/null 2>&1 || { echo "make web: npm is not installed (apt-get install npm)" >&2; exit 69; }
	npm install --prefix web --no-audit --no-fund --loglevel=error
	@touch $(WEB_STAMP)

web-if-npm:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory -s web || \
		echo "make run: could not install MQTT.js (make web); the live page will say so."; \
	else echo "make run: npm not found; the live page needs MQTT.js (apt-get install npm, make web)."; fi

stop:
	@bash tools/run.sh --stop

status:
	@if [ -S run/sv.sock ]; then $(BIN)/supervisorctl -c $(CONF) status || true; \
	else echo "Not running (make run starts it)."; fi

# Re-read the broker's password file and ACL without a restart (SIGHUP; clients stay connected).
reload:
	@$(BIN)/supervisorctl -c $(CONF) signal HUP broker

logs:
	@mkdir -p logs
	@touch logs/broker.log logs/echo_client.log logs/ping_client.log
	tail -n 20 -F logs/broker.log logs/echo_client.log logs/ping_client.log

# ping_client on node 1 and echo_client on node 2 of a fresh two-node RabbitMQ cluster, under
# supervisord (apt-get install rabbitmq-server). Streams the clients' logs and the join; the
# nodes' own logs are in logs/cluster/. Ctrl-C stops everything. See docs/cluster.md.
CLUSTER_LOGS := logs/cluster/join.log logs/cluster/echo_client.log logs/cluster/ping_client.log
cluster: bytecode
	@$(BIN)/python -m cluster write >/dev/null
	@CONF=run/cluster/supervisord.conf PIDFILE=run/cluster/supervisord.pid \
		LOGS="$(CLUSTER_LOGS)" bash tools/run.sh

# make add-user NAME=alice  (asks for the password; writes passwords.txt, mode 0600)
add-user: $(STAMP)
	@test -n "$(NAME)" || { echo "usage: make add-user NAME=alice" >&2; exit 64; }
	$(BIN)/python -m broker.users add "$(NAME)"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: bytecode web
	$(BIN)/python -m pytest -n 3 $(PYTEST_ARGS)

test: lint typecheck pytest

# The suite on every supported Python found here (PATH, then ~/.pyenv); says which it found.
test-pythons:
	@SKIP="$(SKIP)" bash tools/test-pythons.sh $(PYTHONS)

# A picture of a run: RTT over time (losses marked, outages shaded) and the RTT histogram.
# make report                                    logs/ping_client.log -> logs/ping_client.png
# make report REPORT_ARGS="run.jsonl -o run.png"  ping_client --json output, or another log
report: $(REPORT_STAMP)
	$(BIN)/python -m ping_client.report $(REPORT_ARGS)

# Benchmarks against mosquitto (apt-get install mosquitto). Not tests: they measure. They also
# draw bench/results.png.
bench: bytecode $(REPORT_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-full: bytecode $(REPORT_STAMP)
	$(BIN)/python -m bench.run --full

# The round trip across a two-node RabbitMQ cluster, beside one node, ours and mosquitto.
bench-cluster: bytecode
	$(BIN)/python -m bench.cluster

# Fault, flood, load and fuzz figures for the README's Reliability table (about 2 minutes).
soak: bytecode
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean: stop
	rm -rf .venv .venv-3.* build *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f logs/*.log* run/*.pid run/*.sock
	rm -rf logs/cluster run/cluster
