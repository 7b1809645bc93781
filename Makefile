# All targets set up what they need on a fresh machine (tools/setup_env.sh is idempotent).
PY := .venv/bin/python

.PHONY: setup test demo bench bench-train thumbnails clean
setup:
	bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m training.demo --out demo_output

bench: setup
	$(PY) bench/bench_sampling.py

bench-train: setup
	$(PY) bench/bench_train.py

thumbnails: setup
	$(PY) tools/make_template_thumbnails.py

clean:
	rm -rf demo_output .pytest_cache
