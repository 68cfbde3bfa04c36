"""What our code contributes to nnU-Net's DDP training, checked on CPU with gloo and 2 spawned ranks.

nnU-Net's own DDP path (``nnUNetv2_train ... -num_gpus 2``) needs CUDA and NCCL. What does not need them
is checked here, once, in two processes started like nnU-Net's ``mp.spawn`` in run_training (fresh
interpreters, so the ``.pth`` start hook runs again):

* gradients: the landmark network (C + K channels, deep supervision) with the loss built by
  ``_build_loss`` of a real ``nnUNetTrainerLandmark`` constructed in each rank (its own __init__ sees the
  process group and sets the heatmap loss weight and deep supervision) -- each rank 2 of 4 samples,
  DistributedDataParallel averaging -- equal the single-process gradients of the full batch, for batch_dice True and False; the
  all-gathered Dice term is the same on both ranks; every parameter gets a gradient (the 1e-6
  lowest deep-supervision weight), so DDP with find_unused_parameters=False does not complain;
* trainer lookup: in each rank ``recursive_find_trainer_class_by_name`` finds our class in its one
  picklable home, and a folder the user put in ``nnUNet_extTrainer`` is still there (and still searched);
* aggregation: ``on_train_epoch_end`` / ``on_validation_epoch_end`` (ours and nnU-Net's, on a trainer
  stand-in whose __init__ is bypassed) log the same global means on both ranks, NaN errors ignored.

The ranks run once for the whole module (a module fixture); the tests assert on what they wrote back.
"""
from __future__ import annotations

import copy
import importlib
import os
import pickle
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch


WORLD_SIZE = 2
BATCH = 4  # samples of the single-process reference; each rank takes BATCH // WORLD_SIZE of them
PATCH = (16, 16, 16)
LABELS = {"background": 0, "left": 1, "right": 2}  # C = 3 segmentation channels
LANDMARKS = ("apex", "valve")  # K = 2 heatmap channels
DTYPE = torch.float64  # network and inputs; nnU-Net's Dice sums and our heatmap MSE are float32 regardless
# per tensor, relative to the tensor's largest reference gradient. Measured: ~1e-14 in float64 (~3e-6 in float32);
# the float32 Dice sums add over the batch in another order under DDP, which may cost ~1e-7.
GRADIENT_RTOL = 1e-6
USER_TRAINER_MODULE = "my_lab_trainers"
RANK_TIMEOUT_S = 240


# ---------------------------------------------------------------------------------------------- shared set-up
def _plans(batch_dice: bool) -> dict:
    """Plans with a 4-stage ResidualEncoderUNet on 16^3 patches (3 deep-supervision outputs) and landmark heads."""
    from nnunet_landmark.cpu_plans import small_configuration
    from nnunet_landmark.heatmap_targets import HeatmapEncoding
    from nnunet_landmark.landmark_heads import LandmarkHeads
    from nnunet_landmark.landmark_network import HeatmapHeadConfig

    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": {"n_stages": 4, "features_per_stage": [8, 16, 32, 64], "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
                        "n_blocks_per_stage": [1] * 4, "n_conv_per_stage_decoder": [1] * 3, "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {"configurations": {"3d_fullres": {"patch_size": [64, 64, 64], "batch_size": 2, "spacing": [1, 1, 1],
                                               "batch_dice": batch_dice, "architecture": architecture,
                                               "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor"}},
             "dataset_name": "Dataset999_X", "plans_name": "p", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2]}
    plans["configurations"]["3d_cpu"] = small_configuration(plans, patch_size=PATCH, features_per_stage=(4, 8, 16, 32))
    # the default recipe's heads: a decoupled head sending a tenth of its gradient into the segmentation network
    LandmarkHeads(LANDMARKS, len(LABELS), HeatmapEncoding(max_distance_mm=30.0, scale_mm=10.0),
                  head=HeatmapHeadConfig("decoupled", 16, 0.1)).write_to_plans(plans)
    return plans


def _trainer(plans: dict):
    """The real nnUNetTrainerLandmark, built by its own __init__: under DDP where a process group is up (then
    nnU-Net's __init__ picks cuda:<rank>; these checks run on the CPU, so the device is set back), with the
    landmark heads ``initialize()`` makes first. Its loss settings are the trainer's, not this test's."""
    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark

    dataset_json = {"channel_names": {"0": "CT"}, "labels": LABELS, "landmarks": list(LANDMARKS),
                    "numTraining": BATCH, "file_ending": ".nii.gz"}
    trainer = nnUNetTrainerLandmark({**copy.deepcopy(plans), "continue_training": False}, "3d_cpu", 0, dataset_json,
                                    torch.device("cpu"))
    trainer.device = torch.device("cpu")
    trainer.landmark_heads = trainer._make_landmark_heads()
    return trainer


def _network(plans: dict, state_dict: dict | None = None) -> torch.nn.Module:
    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    network = nnUNetTrainerLandmark.build_network_architecture(
        plans_manager, plans_manager.get_configuration("3d_cpu"), 1, len(LABELS), True).to(DTYPE)
    if state_dict is not None:
        network.load_state_dict(state_dict)
    return network


def _batch(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images and the targets nnU-Net's pipeline makes: one segmentation per deep-supervision output + heatmaps."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(BATCH, 1, *PATCH, generator=g, dtype=DTYPE)
    coarse = torch.randint(0, len(LABELS), (BATCH, 1, 4, 4, 4), generator=g)  # blobs, so Dice is not degenerate
    full = coarse.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    noise = torch.randint(0, len(LABELS), full.shape, generator=g)
    full = torch.where(torch.rand(full.shape, generator=g) < 0.2, noise, full)
    segmentations = [full[:, :, ::s, ::s, ::s].to(torch.int16) for s in (1, 2, 4)]
    heatmaps = torch.rand(BATCH, len(LANDMARKS), *PATCH, generator=g)
    return data, segmentations + [heatmaps]


def _nnunet_ds_weights(is_ddp: bool) -> np.ndarray:
    """nnUNetTrainer._build_loss's deep-supervision weights for 3 outputs (no torch.compile)."""
    weights = np.array([1 / (2 ** i) for i in range(3)])
    weights[-1] = 1e-6 if is_ddp else 0
    return weights / weights.sum()


def _forward_backward(network, loss, data, target) -> dict:
    """One training step's loss and gradients; the Dice values of every deep-supervision level are recorded."""
    dice_values = []
    hook = loss.segmentation_loss.loss.dc.register_forward_hook(
        lambda module, args, out: dice_values.append(out.detach().double().clone()))
    try:
        network.zero_grad(set_to_none=True)
        value = loss(network(data), target)
        value.backward()
    finally:
        hook.remove()
    module = network.module if hasattr(network, "module") else network
    return {"loss": float(value.detach()), "segmentation_loss": float(loss.last_segmentation_loss),
            "heatmap_loss": float(loss.last_heatmap_loss), "dice": torch.stack(dice_values),
            "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in module.named_parameters()}}


def _rank_epoch_outputs(rank: int) -> dict:
    """Different per-rank train/validation step outputs (as train_step / validation_step return them)."""
    nan = float("nan")
    heatmap_train = [[0.1, 0.2, 0.3], [0.9, 1.1, 1.3]][rank]
    heatmap_val = [[0.5, 0.7], [0.2, 0.4]][rank]
    errors = [[[1.0, nan], [3.0, 5.0]], [[nan, 7.0], [nan, nan]]][rank]  # epoch 0: finite on both ranks
    errors_all_nan = [[nan, nan], [nan, nan]]  # epoch 1: landmarks outside every validation patch

    def val(step, errs):
        return {"loss": np.array(0.5 + rank + step), "tp_hard": np.array([10.0 + rank, 5.0]),
                "fp_hard": np.array([2.0, 1.0 + rank]), "fn_hard": np.array([1.0, 3.0]),
                "heatmap_loss": np.array(heatmap_val[step], dtype=np.float32), "landmark_errors_mm": list(errs)}

    return {"train": [{"loss": np.array(2.0 + rank + i), "heatmap_loss": np.array(h, dtype=np.float32)}
                      for i, h in enumerate(heatmap_train)],
            "val": [val(step, errors[step]) for step in range(2)],
            "val_all_nan": [val(step, errors_all_nan[step]) for step in range(2)]}


# ---------------------------------------------------------------------------------------------- the ranks
def _check_lookup(user_folder: str) -> dict:
    environment_at_start = os.environ.get("nnUNet_extTrainer")
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    found = recursive_find_trainer_class_by_name("nnUNetTrainerLandmark")
    home = importlib.import_module("nnunet_landmark.training.trainers")
    variant = recursive_find_trainer_class_by_name("nnUNetTrainerLandmark_5epochs")
    variant_home = importlib.import_module("nnunet_landmark.training.variants.training_length")
    user = recursive_find_trainer_class_by_name("MyLabTrainer")
    return {"environment_at_start": environment_at_start,
            "module": found.__module__, "qualname": found.__qualname__,
            "is_home_class": found is home.nnUNetTrainerLandmark,
            "pickle_roundtrip_is_same": pickle.loads(pickle.dumps(found)) is found,
            "variant_module": variant.__module__, "variant_is_home_class": variant is variant_home.nnUNetTrainerLandmark_5epochs,
            "user_trainer": f"{user.__module__}.{user.__qualname__}",
            "lookup_module_left_in_sys_modules": "nnunet_landmark_trainers" in sys.modules,
            "user_folder": user_folder}


def _check_gradients(rank: int, setup: dict) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    data, target = setup["data"], setup["target"]
    mine = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    data, target = data[mine], [t[mine] for t in target]
    results = {}
    for batch_dice in (True, False):
        plans = _plans(batch_dice)
        trainer = _trainer(plans)
        loss = trainer._build_loss()
        network = DistributedDataParallel(_network(plans, setup["state_dict"]))  # find_unused_parameters=False
        step = _forward_backward(network, loss, data, target)
        # a second step: DDP raises here if the first left a parameter without gradient
        second = _forward_backward(network, loss, data, target)
        step["second_step_grads_equal"] = all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(step["grads"].values(), second["grads"].values()))
        dc = loss.segmentation_loss.loss.dc
        step["structure"] = {"trainer_is_ddp": trainer.is_ddp, "dice_class": type(dc).__name__, "dice_ddp": dc.ddp, "batch_dice": dc.batch_dice,
                             "do_bg": dc.do_bg, "weights": list(loss.segmentation_loss.weight_factors),
                             "num_segmentation_channels": loss.num_segmentation_channels,
                             "heatmap_loss_weight": loss.heatmap_loss_weight,
                             "heatmap_weights": list(loss.deep_supervision_heatmap_weights(len(target) - 1))}
        if batch_dice:
            # negative control: the same without the Dice all-gather must NOT reproduce the reference
            dc.ddp = False
            step["grads_without_allgather"] = _forward_backward(network, loss, data, target)["grads"]
            dc.ddp = True
            # negative control: nnU-Net's non-DDP weight 0 for the lowest output leaves parameters unused
            loss.segmentation_loss.weight_factors = tuple(_nnunet_ds_weights(False))
            unused = DistributedDataParallel(_network(plans, setup["state_dict"]))
            try:
                _forward_backward(unused, loss, data, target)
                _forward_backward(unused, loss, data, target)
                step["weight_zero_error"] = None
            except RuntimeError as e:
                step["weight_zero_error"] = str(e)
        results[batch_dice] = step
    return results


def _check_aggregation(rank: int, workdir: Path) -> dict:
    from nnunet_landmark.training.progress_logging import LandmarkLocalLogger
    from nnunet_landmark.training.trainers import nnUNetTrainerLandmark
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    trainer = object.__new__(nnUNetTrainerLandmark)
    trainer.is_ddp = True
    trainer.logger = MetaLogger(str(workdir), False)
    trainer.logger.local_logger = LandmarkLocalLogger()
    outputs = _rank_epoch_outputs(rank)
    for epoch, val_outputs in enumerate((outputs["val"], outputs["val_all_nan"])):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_end(outputs["train"])  # nnU-Net's all_gather_object, then ours
        trainer.on_validation_epoch_end(val_outputs)
    log = trainer.logger.local_logger.my_fantastic_logging
    return {k: [float(np.mean(v)) if np.ndim(v) == 0 else [float(x) for x in v] for v in log[k]]
            for k in ("train_losses", "train_heatmap_losses", "val_losses", "val_heatmap_losses",
                      "val_landmark_errors_mm", "mean_fg_dice")}


def _rank(rank: int, port: int, workdir: str, user_folder: str) -> None:
    """One spawned rank: every check in its own try, so that one failure does not hide the others."""
    torch.set_num_threads(1)
    workdir = Path(workdir)
    results = {"started": time.time()}

    def section(name, function, *args):
        started = time.monotonic()
        try:
            results[name] = function(*args)
        except BaseException:  # noqa: BLE001 - reported to the test process
            results[name] = {"error": traceback.format_exc()}
        results.setdefault("seconds", {})[name] = time.monotonic() - started

    section("lookup", _check_lookup, user_folder)  # first, as in run_ddp: before anything imports our trainers
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD_SIZE, timeout=timedelta(seconds=90))
    try:
        setup = torch.load(workdir / "setup.pt", weights_only=False)
        section("gradients", _check_gradients, rank, setup)
        torch.distributed.barrier()
        section("aggregation", _check_aggregation, rank, workdir)
        torch.distributed.barrier()
    finally:
        torch.save(results, workdir / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- test process
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _installed_start_hook() -> bool:
    import site
    return any(Path(d, "nnunet_landmark.pth").is_file() for d in site.getsitepackages())


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Single-process references, then the 2 gloo ranks; returns everything for the tests to assert on."""
    workdir = tmp_path_factory.mktemp("ddp")
    user_folder = workdir / "user_trainers"
    user_folder.mkdir()
    (user_folder / f"{USER_TRAINER_MODULE}.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n\n\n"
        "class MyLabTrainer(nnUNetTrainer):\n    pass\n")

    with pytest.MonkeyPatch.context() as results_env:
        # the real trainers write their training log where nnU-Net puts results (the ranks inherit this)
        results_env.setenv("nnUNet_results", str(workdir / "nnUNet_results"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # faster for these small float64 convolutions than 2 threads
        torch.manual_seed(0)
        network = _network(_plans(True))
        with torch.no_grad():  # away from the initialisation, whose zeroed residual-block norms block gradients
            for parameter in network.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        state_dict = network.state_dict()
        data, target = _batch()
        torch.save({"state_dict": state_dict, "data": data, "target": target}, workdir / "setup.pt")
        references = {}
        for batch_dice in (True, False):
            plans = _plans(batch_dice)
            # the DDP loss (same deep-supervision weights, incl. the 1e-6) without the cross-rank gather: the full batch
            reference_trainer = _trainer(plans)
            reference_trainer.is_ddp = True
            loss = reference_trainer._build_loss()
            loss.segmentation_loss.loss.dc.ddp = False
            references[batch_dice] = _forward_backward(_network(plans, state_dict), loss, data, target)
            single_trainer = _trainer(plans)
            single = single_trainer._build_loss()
            references[batch_dice]["structure"] = {"trainer_is_ddp": single_trainer.is_ddp,
                                                   "dice_ddp": single.segmentation_loss.loss.dc.ddp,
                                                   "weights": list(single.segmentation_loss.weight_factors)}
        torch.set_num_threads(threads)

        started = time.monotonic()
        with pytest.MonkeyPatch.context() as mp:
            # what a user may have set in the shell; the ranks' start hook must append to it, not replace it
            mp.setenv("nnUNet_extTrainer", str(user_folder))
            mp.setenv("OMP_NUM_THREADS", "1")
            mp.delenv("nnUNet_compile", raising=False)
            mp.delenv("nnUNet_wandb_enabled", raising=False)
            context = torch.multiprocessing.spawn(_rank, args=(_free_port(), str(workdir), str(user_folder)),
                                                  nprocs=WORLD_SIZE, join=False)
        try:
            while not context.join(timeout=2):
                if time.monotonic() - started > RANK_TIMEOUT_S:
                    raise TimeoutError(f"the ranks did not finish within {RANK_TIMEOUT_S} s")
        except BaseException as e:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"spawned ranks failed: {e}")
        ranks = [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return {"references": references, "ranks": ranks, "user_folder": str(user_folder),
            "seconds": time.monotonic() - started}


def _section(ddp, name: str) -> list[dict]:
    sections = [r[name] for r in ddp["ranks"]]
    for rank, s in enumerate(sections):
        if "error" in s:
            pytest.fail(f"rank {rank}, {name}:\n{s['error']}")
    return sections


def _max_relative_difference(grads: dict, reference: dict) -> tuple[float, str]:
    """max |grad - reference| / max |reference| over the parameter tensors (floored at 1e-9 of the largest
    gradient: a conv bias in front of an InstanceNorm has a gradient of 0 up to rounding)."""
    floor = 1e-9 * max(float(ref.abs().max()) for ref in reference.values())
    worst, where = 0.0, ""
    for name, ref in reference.items():
        scale = max(float(ref.abs().max()), floor)
        difference = float((grads[name] - ref).abs().max()) / scale
        if difference > worst:
            worst, where = difference, name
    return worst, where


# ---------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("batch_dice", [True, False], ids=["batch_dice", "sample_dice"])
def test_ddp_gradients_equal_single_process_gradients(ddp, batch_dice):
    """Two ranks with 2 samples each, DDP-averaged, give the gradients of one process with all 4 samples."""
    reference = ddp["references"][batch_dice]
    ranks = [r[batch_dice] for r in _section(ddp, "gradients")]
    assert all(g is not None for g in reference["grads"].values())
    assert all(float(g.abs().max()) > 0 for n, g in reference["grads"].items() if n.endswith(".weight")), \
        "with zero gradients this comparison would prove little"
    for rank, result in enumerate(ranks):
        assert result["grads"].keys() == reference["grads"].keys()
        assert all(g is not None for g in result["grads"].values()), f"rank {rank}: a parameter got no gradient"
        worst, where = _max_relative_difference(result["grads"], reference["grads"])
        print(f"batch_dice={batch_dice} rank {rank}: max gradient difference {worst:.2e} (relative, {where})")
        assert worst < GRADIENT_RTOL, f"rank {rank}: {where} differs by {worst:.2e} of its largest gradient"
    for name in reference["grads"]:  # DDP's all-reduce leaves the very same numbers on every rank
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
    # the loss is the mean of the ranks' losses: CE, heatmap MSE, per-sample Dice average; the batch Dice is global
    assert np.mean([r["loss"] for r in ranks]) == pytest.approx(reference["loss"], rel=1e-6)
    assert np.mean([r["heatmap_loss"] for r in ranks]) == pytest.approx(reference["heatmap_loss"], rel=1e-6)


def test_batch_dice_is_the_same_on_every_rank(ddp):
    """With batch_dice the Dice terms (all-gathered tp/fp/fn) are bit-identical on both ranks and equal the
    full-batch Dice; with per-sample Dice they are each rank's own (and differ)."""
    results = _section(ddp, "gradients")
    batch = [r[True]["dice"] for r in results]
    assert batch[0].shape == (3,)  # one Dice per deep-supervision output, the 1e-6-weighted one included
    assert torch.equal(batch[0], batch[1])
    torch.testing.assert_close(batch[0], ddp["references"][True]["dice"], rtol=1e-6, atol=0)
    sample = [r[False]["dice"] for r in results]
    assert not torch.allclose(sample[0], sample[1])
    torch.testing.assert_close((sample[0] + sample[1]) / 2, ddp["references"][False]["dice"], rtol=1e-6, atol=0)
    # the CE and heatmap terms are each rank's own, so the total losses differ between the ranks
    assert results[0][True]["loss"] != results[1][True]["loss"]


def test_the_dice_allgather_is_what_makes_batch_dice_gradients_right(ddp):
    """Negative control: without the all-gather, the ranks' averaged gradients are not the reference's, by far
    more than the tolerance above (so that comparison can fail)."""
    results = _section(ddp, "gradients")
    worst, where = _max_relative_difference(results[0][True]["grads_without_allgather"],
                                            ddp["references"][True]["grads"])
    print(f"without the Dice all-gather: max gradient difference {worst:.2e} (relative, {where})")
    assert worst > 1000 * GRADIENT_RTOL


def test_every_parameter_gets_a_gradient_under_ddp(ddp):
    """The loss is built as nnU-Net builds it (lowest deep-supervision weight 1e-6 under DDP, 0 otherwise); with
    it, a second DDP step (find_unused_parameters=False) runs; with the weight 0 DDP refuses, as nnU-Net says."""
    results = _section(ddp, "gradients")
    for batch_dice in (True, False):
        for result in results:
            step = result[batch_dice]
            assert step["structure"] == {"trainer_is_ddp": True, "dice_class": "MemoryEfficientSoftDiceLoss",
                                         "dice_ddp": True,
                                         "batch_dice": batch_dice, "do_bg": False,
                                         "weights": pytest.approx(list(_nnunet_ds_weights(True)), rel=1e-12),
                                         "num_segmentation_channels": len(LABELS), "heatmap_loss_weight": 10.0,
                                         "heatmap_weights": pytest.approx(list(_nnunet_ds_weights(True)), rel=1e-12)}
            assert step["structure"]["weights"][-1] > 0
            assert step["second_step_grads_equal"]
            lowest = [g for n, g in step["grads"].items() if n.startswith("decoder.seg_layers.2.")]
            assert len(lowest) == 2 and all(float(g.abs().max()) > 0 for g in lowest)
        single = ddp["references"][batch_dice]["structure"]
        assert single["trainer_is_ddp"] is False and single["dice_ddp"] is False
        assert single["weights"] == pytest.approx(list(_nnunet_ds_weights(False)), rel=1e-12)
    for result in results:
        error = result[True]["weight_zero_error"]
        assert error is not None and "finished reduction" in error, error


def test_trainer_lookup_in_spawned_ranks(ddp):
    """In each fresh rank nnU-Net's lookup finds our class in nnunet_landmark.training.trainers (one picklable
    home), and the user's nnUNet_extTrainer folder is kept in front of ours and still searched."""
    if not _installed_start_hook():
        pytest.skip("nnunet_landmark.pth is not installed in this interpreter's site-packages")
    for result in _section(ddp, "lookup"):
        parts = result["environment_at_start"].split(os.pathsep)
        assert parts[0] == ddp["user_folder"], parts
        assert len(parts) == 2 and Path(parts[1]).name == "_nnunet_landmark_trainer_lookup", parts
        assert (Path(parts[1]) / "nnunet_landmark_trainers.py").is_file()
        assert result["module"] == "nnunet_landmark.training.trainers"
        assert result["qualname"] == "nnUNetTrainerLandmark"
        assert result["is_home_class"] and result["pickle_roundtrip_is_same"]
        assert result["variant_module"] == "nnunet_landmark.training.variants.training_length"
        assert result["variant_is_home_class"]
        assert result["user_trainer"] == f"{USER_TRAINER_MODULE}.MyLabTrainer"
        assert not result["lookup_module_left_in_sys_modules"]


def test_epoch_end_logs_global_means_on_every_rank(ddp):
    """on_train_epoch_end / on_validation_epoch_end gather across ranks: both log the mean over all ranks' steps,
    the landmark error ignoring NaNs (and NaN when no error is finite anywhere)."""
    logs = _section(ddp, "aggregation")
    outputs = [_rank_epoch_outputs(r) for r in range(WORLD_SIZE)]
    train_heatmap = np.mean([float(o["heatmap_loss"]) for out in outputs for o in out["train"]])
    val_heatmap = np.mean([float(o["heatmap_loss"]) for out in outputs for o in out["val"]])
    errors = np.array([e for out in outputs for o in out["val"] for e in o["landmark_errors_mm"]])
    assert np.nanmean(errors) == 4.0  # rank 0 alone: 3.0, rank 1 alone: 7.0
    for log in logs:
        assert log["train_heatmap_losses"] == pytest.approx([train_heatmap] * 2, rel=1e-6)
        assert log["val_heatmap_losses"] == pytest.approx([val_heatmap] * 2, rel=1e-6)
        assert log["val_landmark_errors_mm"][0] == pytest.approx(4.0)
        assert np.isnan(log["val_landmark_errors_mm"][1])
    # nnU-Net's own gathered values, logged through the same calls, agree as well
    for key in ("train_losses", "val_losses", "mean_fg_dice"):
        np.testing.assert_array_equal(logs[0][key], logs[1][key], err_msg=key)
    np.testing.assert_equal(logs[0], logs[1])
