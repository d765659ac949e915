# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt
DEMO_DIR ?= demo_data
EXTRAS ?= dev

.PHONY: setup demo test test-cluster fuzz lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

demo: setup
	$(VENV)/bin/lvita demo-data $(DEMO_DIR)
	for s in 1 2 3 4; do \
	  LVITA_DEMO_ROOT=$(abspath $(DEMO_DIR)) $(VENV)/bin/lvita plan manifests/demo/stage$$s.yaml \
	    --quiet --out $(DEMO_DIR)/plans/stage$$s.json || exit 1; \
	  rm -rf $(DEMO_DIR)/shards/stage$$s; \
	  LVITA_DEMO_ROOT=$(abspath $(DEMO_DIR)) $(VENV)/bin/lvita build manifests/demo/stage$$s.yaml \
	    --out $(DEMO_DIR)/shards/stage$$s --workers 2 --quiet || exit 1; \
	  $(VENV)/bin/lvita stats $(DEMO_DIR)/shards/stage$$s \
	    --html $(DEMO_DIR)/reports/stage$$s.html || exit 1; \
	done
	# train the tiny model on the stage-2 shards (2 ranks, CP = 2; prints the first and last
	# loss), then generate from the exported checkpoint
	rm -rf $(DEMO_DIR)/runs/demo
	LVITA_DEMO_ROOT=$(abspath $(DEMO_DIR)) $(VENV)/bin/lvita train configs/train/demo.yaml \
	  --nproc-per-node 2
	$(VENV)/bin/lvita generate $(DEMO_DIR)/runs/demo/hf --prompt "Describe the picture." \
	  --image $(DEMO_DIR)/longvita/images/img_2x2.png --max-new-tokens 8

test: setup
	$(PY) -m pytest -q

# only the Ray cluster tests (also in `make test`): two nodes started with `ray start` on this
# machine, builds with RAY_ADDRESS, a Ray worker and the driver killed with -9
test-cluster: setup
	$(PY) -m pytest -q -m cluster

# the fuzz suite of every shard reader (tests/data/test_fuzz.py) with many more examples
fuzz: setup
	LVITA_FUZZ_EXAMPLES=500 $(PY) -m pytest -q tests/data/test_fuzz.py -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/bench_plan.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
