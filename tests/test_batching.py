"""Dynamic batching in a real diffusion worker: compatible jobs share one pipeline call,
incompatible ones never do, and every job says what batch it ran in."""

from __future__ import annotations

import pytest

from blaze_jobs.client import BlazeClient
from blaze_jobs.stack import Stack
from tests.conftest import start_api, wait_for_workers, wait_until

pytestmark = pytest.mark.timeout(240)


def test_compatible_jobs_run_as_one_batch_and_others_apart(own_stack: Stack) -> None:
    # Given a worker batching up to 4 jobs, waiting up to 5 s for companions (the six jobs
    # below arrive one HTTP request after another, however busy the machine)
    api_url = start_api(own_stack)
    own_stack.blaze("worker", "worker", "--engine", "diffusion", "--max-batch", "4", "--max-wait-ms", "5000")
    wait_for_workers(api_url, 1)

    with BlazeClient(api_url) as client:
        # When four jobs of one size and two of another arrive together
        small = [
            client.submit("diffusion", {"prompt": f"fox {n}", "seed": n, "num_inference_steps": 4, "width": 32, "height": 32})
            for n in range(4)
        ]
        large = [client.submit("diffusion", {"prompt": f"owl {n}", "seed": n, "num_inference_steps": 4}) for n in range(2)]
        small = [client.wait(j["id"], timeout=180) for j in small]
        large = [client.wait(j["id"], timeout=180) for j in large]

        # Then the four ran as one batch, the two as another: sizes never mixed
        assert [j["metrics"]["batch_size"] for j in small] == [4, 4, 4, 4]
        assert [j["metrics"]["batch_size"] for j in large] == [2, 2]
        assert {(i["width"], i["height"]) for j in small for i in j["output"]["images"]} == {(32, 32)}
        assert {(i["width"], i["height"]) for j in large for i in j["output"]["images"]} == {(64, 64)}
        # and each kept its own seed
        assert [j["output"]["images"][0]["seed"] for j in small] == [0, 1, 2, 3]

        # and the worker reports what it did (at its next heartbeat)
        worker = wait_until(
            lambda: (w := wait_for_workers(api_url, 1)[0])["batches_run"] >= 2 and w, timeout=30, what="two batches reported"
        )
        assert worker["engine"] == "diffusion" and worker["device"] == "cpu" and worker["max_batch"] == 4
        assert worker["models"] == ["builtin:tiny-sd"]
        assert worker["breaker"]["state"] == "closed"
        assert worker["batches_run"] >= 2 and worker["mean_batch_size"] >= 2
        assert worker["device_busy_s"] > 0
