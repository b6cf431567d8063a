"""Training and adding on their hardware (infra/resources.py gpu_task_resources and cpus_per_gpu, stages/add.py
add_task_resources, ivf/index.py add_assigned): what a GPU task reserves, whether the add takes GPUs, and
the coarse assignment done by another index (a GPU's in a GPU build) giving the index add_with_ids gives.
The GPU side runs where FAISS sees a GPU (skipped here) and in benchmarks/train_add_benchmark.py."""

import faiss
import numpy as np
import pytest

from rayindex.infra.resources import NodeGroup, cpus_per_gpu, gpu_task_resources
from rayindex.ivf.index import add_assigned, flat_assigner, gpu_assigner, gpus_usable, make_index
from rayindex.stages.add import add_task_resources


def test_gpu_tasks_take_a_gpu_and_the_cpus_that_go_with_it():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 16, "GPU": 2}},
        {"Alive": True, "Resources": {"CPU": 48, "GPU": 4}},
        {"Alive": True, "Resources": {"CPU": 96}},  # a CPU node: never the measure of a GPU task
        {"Alive": False, "Resources": {"CPU": 4, "GPU": 1}},
    ]
    # training: a whole GPU node's CPUs, the smallest one's (the task must fit whichever it lands on)
    assert gpu_task_resources(nodes, whole_node=True) == {"num_cpus": 16, "num_gpus": 1}
    assert gpu_task_resources(nodes, whole_node=False) == {"num_cpus": 8, "num_gpus": 1}  # add: CPUs per GPU
    assert gpu_task_resources(nodes[2:], whole_node=True) == {"num_cpus": 1, "num_gpus": 1}  # no GPU node up yet
    # CPUs per GPU, one function for the encoders and the add tasks: the smallest alive GPU node's ratio, else the
    # reported GPU node types', else unknown (1 CPU asked)
    groups = [NodeGroup("cpu", {"CPU": 32}, 4), NodeGroup("gpu", {"CPU": 24, "GPU": 4}, 2)]
    assert cpus_per_gpu(nodes) == 8 and cpus_per_gpu(nodes[2:], groups) == 6 and cpus_per_gpu(nodes[2:]) is None
    assert gpu_task_resources(nodes[2:], whole_node=False, groups=groups) == {"num_cpus": 6, "num_gpus": 1}
    assert gpu_task_resources([{"Alive": True, "Resources": {"CPU": 12, "GPU": 5}}], False) == {
        "num_cpus": 2,  # whole CPUs: 2.4 per GPU
        "num_gpus": 1,
    }


def test_the_add_takes_gpus_only_where_one_is_up_now():
    """A GPU build whose GPU workers scaled down after training assigns on the CPUs there are, one per task,
    rather than wait for GPU nodes to be launched again; a CPU build never asks for a GPU."""
    gpu_node = {"Alive": True, "Resources": {"CPU": 16, "GPU": 2}}
    cpu_node = {"Alive": True, "Resources": {"CPU": 8}}
    gone = {"Alive": False, "Resources": {"CPU": 16, "GPU": 2}}
    assert add_task_resources(True, [cpu_node, gpu_node]) == {"num_cpus": 8, "num_gpus": 1}
    assert add_task_resources(True, [cpu_node, gone]) == {"num_cpus": 1}  # scaled down: CPUs, no wait
    assert add_task_resources(True, [cpu_node]) == {"num_cpus": 1}
    assert add_task_resources(False, [cpu_node, gpu_node]) == {"num_cpus": 1}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 32)).astype(np.float32)
    x = centres[rng.integers(0, 40, 4_000)] + 0.3 * rng.normal(size=(4_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.arange(10_000, 14_000, dtype=np.int64)


def trained(index_string: str, x: np.ndarray) -> faiss.Index:
    index = make_index(index_string, x.shape[1], "cosine")
    faiss.extract_index_ivf(index).cp.seed = 5
    index.train(x)
    return index


@pytest.mark.parametrize("index_string", ["IVF16,PQ8x4np", "PCA16,IVF16,PQ8x4np", "IVF16,Flat"])
def test_assigning_with_an_exact_assigner_gives_the_same_index_byte_for_byte(index_string, data):
    """PCA stands for any pre-transform (OPQ's training takes minutes on this machine's busy cores)."""
    x, ids = data
    plain, assigned = trained(index_string, x), trained(index_string, x)
    plain.add_with_ids(x, ids)
    assigner = flat_assigner(assigned)
    for start in range(0, len(x), 1_500):  # in chunks, as the add stage does
        add_assigned(assigned, x[start : start + 1_500], ids[start : start + 1_500], assigner)
    assert assigned.ntotal == plain.ntotal == len(x)
    assert np.array_equal(faiss.serialize_index(assigned), faiss.serialize_index(plain))


def test_an_hnsw_quantizers_lists_are_assigned_exactly(data):
    """With an HNSW quantizer the flat assigner puts each vector in its exact nearest list (the graph
    approximates it), and the index keeps its HNSW quantizer for search."""
    x, ids = data
    index = trained("IVF16_HNSW32,Flat", x)
    add_assigned(index, x, ids, flat_assigner(index))
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    nearest = np.argmax(x @ centroids.T, axis=1)
    for list_no in range(ivf.nlist):
        held = faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), ivf.invlists.list_size(list_no))
        assert set(held.tolist()) == set(ids[nearest == list_no].tolist())
    assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSWFlat)


def test_without_a_gpu_the_add_assigns_on_the_cpu_as_before(data):
    if gpus_usable():
        pytest.skip("FAISS sees a GPU here: test_the_gpu_assigner_agrees_with_the_exact_one covers it")
    assert gpu_assigner(trained("IVF16,Flat", data[0])) is None


@pytest.mark.skipif(not gpus_usable(), reason="needs faiss-gpu and a GPU")
def test_the_gpu_assigner_agrees_with_the_exact_one(data):
    x, ids = data
    index = trained("IVF16,PQ8x4np", x)
    _, on_gpu = gpu_assigner(index).search(x, 1)
    _, exact = flat_assigner(index).search(x, 1)
    assert np.mean(on_gpu == exact) > 0.999  # float sums in another order: a tie may break the other way
