"""DataPositions: a recreated EnvRunner gets back the prompt position recorded after the last iteration.

RLlib's EnvRunnerGroup is replaced by a small stand-in holding real prompt streams; the real
multi-node kill test is ``tests/cluster/test_cluster_runs.py::test_env_runner_killed_mid_training_the_run_completes``.
"""

from types import SimpleNamespace

from envs.prompt_stream import PromptStream
from policies.callbacks import DataPositions


class Runner:
    def __init__(self, worker_index, seed):
        self.worker_index = worker_index
        vector_env = SimpleNamespace(
            get_data_position=lambda: self.stream.state(), set_data_position=lambda s: self.stream.restore(s)
        )
        self.env = SimpleNamespace(unwrapped=vector_env)
        self.stream = PromptStream(10, seed)


class Group:
    """The parts of RLlib's EnvRunnerGroup the callback uses: a local runner without env, remotes 1..n."""

    def __init__(self, n):
        self.local_env_runner = SimpleNamespace(worker_index=0, env=None)
        self.remote = {i: Runner(i, seed=i) for i in range(1, n + 1)}

    def foreach_env_runner(self, func, local_env_runner=True, remote_worker_ids=None):
        ids = remote_worker_ids if remote_worker_ids else list(self.remote)
        return ([func(self.local_env_runner)] if local_env_runner else []) + [func(self.remote[i]) for i in ids]


def test_recreated_runner_continues_from_its_last_recorded_position():
    group, cb = Group(2), DataPositions()
    algo = SimpleNamespace(env_runner_group=group)
    for _ in range(7):
        group.remote[1].stream.next()
    for _ in range(3):
        group.remote[2].stream.next()
    cb.on_train_result(algorithm=algo, result={})
    assert cb.positions == {1: {"seed": 1, "position": 7}, 2: {"seed": 2, "position": 3}}

    group.remote[1] = Runner(1, seed=1)  # RLlib restarted runner 1: a fresh stream at 0
    group.remote[2].stream.next()
    cb.on_env_runners_recreated(algorithm=algo, env_runner_group=group, env_runner_indices=[1], is_evaluation=False)
    assert group.remote[1].stream.position == 7
    assert group.remote[2].stream.position == 4  # a runner that was not recreated is left alone


def test_runner_restarted_unnoticed_is_moved_on_after_the_iteration():
    group, cb = Group(1), DataPositions()
    algo = SimpleNamespace(env_runner_group=group)
    for _ in range(7):
        group.remote[1].stream.next()
    cb.on_train_result(algorithm=algo, result={})
    group.remote[1] = Runner(1, seed=1)  # Ray restarted it between two calls: no recreated callback
    group.remote[1].stream.next()
    cb.on_train_result(algorithm=algo, result={})
    assert group.remote[1].stream.position == 7 and cb.positions[1]["position"] == 7
