"""The server's Job: outputs that reach it together are recorded in order and merged per choice."""

import asyncio
import threading
from types import SimpleNamespace

from grok1.engine.sampling import SamplingParams
from grok1.engine.scheduler import Output, TokenLogprob
from grok1.server.bridge import Job
from grok1.server.metrics import Metrics


class FakeEngine:
    def __init__(self) -> None:
        self.callbacks, self.cancelled = [], []

    def add_request(self, ids, params, logprobs=None, on_output=None, prompt_logprobs=None):  # EngineClient's
        self.callbacks.append(on_output)
        return SimpleNamespace(id=f"r{len(self.callbacks)}", finish_reason=None)

    def cancel(self, request_id):
        self.cancelled.append(request_id)


def out(rid, tokens, text, finish=None, done=0, lps=()):
    return Output(rid, tokens, text, list(lps), finish, 3, done)


def test_outputs_that_arrive_together_become_one_per_choice_in_order():
    async def main():
        eng = FakeEngine()
        job = Job(eng, Metrics())
        job.submit([[1, 2, 3], [1, 2, 3]], [SamplingParams(temperature=0)] * 2, None, "prompt")
        first, second = eng.callbacks
        lp = TokenLogprob(7, -0.5, [])

        def engine_thread():  # as the engine's thread delivers them
            first(out("r1", [7], "a", done=1, lps=[lp]))
            second(out("r2", [8], "x", done=1))
            first(out("r1", [9], "b", done=2, lps=[lp]))
            first(out("r1", [], "", finish="length", done=2))

        t = threading.Thread(target=engine_thread)
        t.start()
        t.join()
        got = await job.next(timeout=5)
        # choice 1's outputs merged, placed where its last one arrived; text and logprobs in order
        assert [i for i, _ in got] == [1, 0]
        merged = got[1][1]
        assert merged.token_ids == [7, 9] and merged.text == "ab" and merged.logprobs == [lp, lp]
        assert merged.finish_reason == "length" and merged.completion_tokens == 2
        assert job.choices[0].text == "ab" and job.choices[0].finish_reason == "length"
        assert job.choices[1].text == "x" and not job.done
        assert await job.next(timeout=0.05) == []  # nothing more: an empty list after the timeout
        second(out("r2", [], "", finish="stop", done=1))  # from the loop's own thread works too
        assert [(i, o.finish_reason) for i, o in await job.next(timeout=5)] == [(1, "stop")]
        assert job.done

    asyncio.run(main())
