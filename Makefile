# gmoe-bench: `make help` lists the targets. Each target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 by default (the CPU wheel where pip's index serves it); a CUDA build comes from
# PyTorch's index, e.g.
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 make install TORCH_SPEC='torch==2.13.0+cu126'
# (pip reads PIP_EXTRA_INDEX_URL from the environment). Where pip resolves torch==2.13.0 to a CUDA
# build (Linux, PyPI), a CPU-only build comes from PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make install TORCH_SPEC='torch==2.13.0+cpu'
# The spec of the last install is kept in $(VENV)/.torch-spec and is the default afterwards; another
# TORCH_SPEC reruns the install (pip keeps an installed torch that already satisfies the new spec,
# as torch==2.13.0 accepts 2.13.0+cu126: `make clean install` starts over).
STAMP := $(VENV)/.installed
SPEC_FILE := $(VENV)/.torch-spec
INSTALLED_SPEC := $(or $(shell cat '$(SPEC_FILE)' 2>/dev/null),torch==2.13.0)
TORCH_SPEC ?= $(INSTALLED_SPEC)
ARGS ?=
EXP ?= paper_molbbbp
DIRS ?= multirun
OUT ?= results/report
# Use the offline OGB copies beside the checkout when they exist (air-gapped machines, CI).
ifneq ($(wildcard ../shared/data/ogb),)
export GMOE_DATA_MIRROR ?= $(abspath ../shared/data/ogb)
endif

.PHONY: FORCE help install train test lint sweep report bench bench-gpu reproduce-molbbbp reproduce-molhiv reproduce-suite reproduce-official reproduce-official-ablation check-dataset analyses clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-20s %s\n", $$1, $$2}'

# A TORCH_SPEC other than the installed one's reinstalls; the same one is a no-op.
ifneq ($(TORCH_SPEC),$(INSTALLED_SPEC))
$(STAMP): FORCE
endif
FORCE:

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[dev]'
	printf '%s\n' '$(TORCH_SPEC)' > $(SPEC_FILE)
	touch $@

install: $(STAMP)  ## create .venv with torch (TORCH_SPEC, see the Makefile) and gmoe-bench (editable)

train: $(STAMP)  ## train with the defaults (ogbg-molbbbp, GCN, 3 seeds); more options: ARGS="..."
	$(BIN)/gmoe-train $(ARGS)

test: $(STAMP)  ## run the test suite (real-data tests too when GMOE_DATA_MIRROR is set)
	$(BIN)/python -m pytest -q

sweep: $(STAMP)  ## run a sweep from gmoe_bench/configs/experiment/: EXP=paper_molbbbp, ARGS="hydra/launcher=parallel ..."
	$(BIN)/gmoe-train -m +experiment=$(EXP) $(ARGS)

report: $(STAMP)  ## tables and plots from run/sweep folders: DIRS="multirun/..." OUT=results/report
	$(BIN)/gmoe-report $(DIRS) --out $(OUT)

# A table, end to end: the baselines with 10 seeds, the GMoE search with 3, the configuration with the
# best validation per backbone with 10 (its search seeds are reused from the checkpoints when the search
# ran the same protocol), then the table (baselines and selected rows) and the search's own report.
# $(1) dataset, $(2) the search's experiment and overrides, $(3) run folder, $(4) results folder,
# $(5) overrides after gmoe-select's for the selected runs.
define reproduce
	$(BIN)/gmoe-train -m +experiment=paper_baselines dataset=$(1) hydra.sweep.dir=$(3)/baselines $(ARGS)
	$(BIN)/gmoe-train -m $(2) hydra.sweep.dir=$(3)/search $(ARGS)
	for b in gcn gin; do \
	  o=$$($(BIN)/gmoe-select $(3)/search --backbone $$b) || exit 1; \
	  $(BIN)/gmoe-train +experiment=paper_selected $$o $(5) hydra.run.dir=$(3)/selected_$$b $(ARGS) || exit 1; \
	done
	$(BIN)/gmoe-report $(3)/baselines $(3)/selected_gcn $(3)/selected_gin --out $(4)
	$(BIN)/gmoe-report $(3)/search --out $(4)/search
endef

reproduce-molbbbp: $(STAMP)  ## the paper's ogbg-molbbbp table: baselines, GMoE search, selected configs (10 seeds), report
	$(call reproduce,ogbg-molbbbp,+experiment=paper_molbbbp,multirun/paper_molbbbp,results/paper_molbbbp)

reproduce-molhiv: $(STAMP)  ## the same for ogbg-molhiv (use a GPU: ARGS="trainer.device=cuda")
	$(call reproduce,ogbg-molhiv,+experiment=paper_molhiv,multirun/paper_molhiv,results/paper_molhiv)

# A suite table (any dataset with a config in gmoe_bench/configs/dataset/, DATASET=ogbg-molfreesolv) with the small GMoE search
# (experiment=suite_search: 3 seeds × 30 epochs); the selected rows run the paper protocol (100 epochs).
reproduce-suite: check-dataset $(STAMP)  ## a suite table for DATASET=ogbg-mol...: baselines, small GMoE search, selected configs (10 × 100), report
	$(call reproduce,$(DATASET),+experiment=suite_search dataset=$(DATASET),multirun/suite/$(DATASET),results/suite/$(DATASET),trainer.epochs=100)

# The fidelity table under the official code's semantics (preset=official, docs/official.md) on
# ogbg-molbbbp, 10 seeds × 100 epochs per row: GCN and GIN at hidden 300, GMoE-GCN and GMoE-GIN with
# n=8 all hop-1, k=4 (the official script's configuration), GMoE-GCN with n=8 all hop-2, k=4. On a GPU:
#   ARGS="trainer.device=cuda trainer.cuda_graphs=true trainer.seeds_per_group=10"
OFFICIAL := preset=official dataset=ogbg-molbbbp
reproduce-official: $(STAMP)  ## the preset=official table on ogbg-molbbbp (5 rows × 10 seeds), report -> results/official_molbbbp
	$(BIN)/gmoe-train -m $(OFFICIAL) +experiment=paper_baselines model.hidden_dim=300 hydra.sweep.dir=multirun/official_molbbbp/baselines $(ARGS)
	$(BIN)/gmoe-train -m $(OFFICIAL) +experiment=paper_selected model=gcn,gin experts=n8_hop1 moe.top_k=4 hydra.sweep.dir=multirun/official_molbbbp/n8hop1 $(ARGS)
	$(BIN)/gmoe-train $(OFFICIAL) +experiment=paper_selected model=gcn experts=n8_hop2 moe.top_k=4 hydra.run.dir=multirun/official_molbbbp/gmoe_gcn_n8hop2 $(ARGS)
	$(BIN)/gmoe-report multirun/official_molbbbp --out results/official_molbbbp

# Which single setting of the preset moves GMoE-GCN (n=8 all hop-1, k=4) most: the preset, then
# one change each, 2 seeds × 30 epochs (shortened).
reproduce-official-ablation: $(STAMP)  ## one-factor ablation of preset=official on GMoE-GCN (30 epochs, 2 seeds), report -> results/official_ablation_30ep
	for change in preset: no_drop:dataset.drop_node_p=0 sum:moe.combine=sum sparse:moe.dispatch=sparse; do \
	  $(BIN)/gmoe-train $(OFFICIAL) +experiment=paper_selected model=gcn experts=n8_hop1 moe.top_k=4 trainer.epochs=30 'seeds=[0,1]' \
	    $${change#*:} hydra.run.dir=multirun/official_ablation_30ep/$${change%%:*} $(ARGS) || exit 1; \
	done
	$(BIN)/gmoe-report multirun/official_ablation_30ep --out results/official_ablation_30ep

check-dataset:  # before anything is installed or trained
	@test -n "$(DATASET)" || { echo "reproduce-suite: no dataset named; run e.g. make reproduce-suite DATASET=ogbg-molfreesolv." >&2; exit 2; }

analyses: $(STAMP)  ## hop split, λ and equal-parameter comparisons on ogbg-molbbbp, reported (ARGS="trainer.epochs=30")
	$(BIN)/gmoe-train -m +experiment=analysis_hops hydra.sweep.dir=multirun/analysis_molbbbp/hops $(ARGS)
	$(BIN)/gmoe-train -m +experiment=analysis_lambda hydra.sweep.dir=multirun/analysis_molbbbp/lambda $(ARGS)
	$(BIN)/gmoe-train -m +experiment=analysis_capacity hydra.sweep.dir=multirun/analysis_molbbbp/capacity $(ARGS)
	for a in hops lambda capacity; do $(BIN)/gmoe-report multirun/analysis_molbbbp/$$a --out results/analysis_molbbbp/$$a || exit 1; done
	$(BIN)/gmoe-routing multirun/analysis_molbbbp/hops --out results/analysis_molbbbp/routing

bench: $(STAMP)  ## speed benchmark (step times over the GMoE grid, hop-2, data loading; seeds together) -> results/bench/
	$(BIN)/python scripts/bench.py $(ARGS)
	$(BIN)/python scripts/bench_seeds.py

bench-gpu: $(STAMP)  ## GPU benchmark (molhiv epochs eager and from CUDA graphs, FLOPs, share of peak; dense experts) -> results/bench/
	$(BIN)/python scripts/bench_gpu.py $(ARGS)
	$(BIN)/python scripts/bench_dense.py --device cuda

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check gmoe_bench scripts tests

clean:  ## remove the virtual environment and caches (not data/, outputs/ or multirun/)
	rm -rf $(VENV) .pytest_cache .ruff_cache
