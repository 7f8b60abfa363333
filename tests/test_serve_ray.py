"""`emloc serve --ray`: a real local Ray cluster (2 CPUs, no dashboard), a real redis-server on a free
port as the shared store, 2 replicas of a tiny random-weight Llama, 4 skills from the bundled tasks, and
the real ``openai`` client over HTTP through Ray Serve's proxy.

Compressions are counted by redis-server itself: a keyspace notification for every write of a memory
key (a replica writes a memory only after compressing it, under the store lock; loading never writes).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from emloc_agents import EMLoCChatModel, MemoryRegistry
from emloc_agents.store import MemoryStore
from emloc_agents.tasks import Task
from tests.conftest import free_port, redis_server

ray = pytest.importorskip("ray", reason="Ray Serve is the ray extra: pip install 'emloc-agents[ray]'")
serve = pytest.importorskip("ray.serve")
redis = pytest.importorskip("redis")

from emloc_agents.ray_serve import build_app, chat_factory  # noqa: E402
from emloc_agents.serve.skills_api import skill_body  # noqa: E402

MODEL = "tiny-llama"
TASKS = ("sst2", "trec", "agnews", "rte")
QUERIES = 4  # per skill
CHAT_FIELDS = {"max_tokens": 4, "cache_prompt": False}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server("--notify-keyspace-events", "K$") as url:  # MemoryWrites counts the writes
        yield url


class MemoryWrites:
    """Every SET of a memory key in ``namespace``, as redis-server announces it."""

    def __init__(self, url: str, namespace: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe(f"__keyspace@0__:{namespace}:d:memory:*")
        self.writes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            msg = self.pubsub.get_message(timeout=0.1)
            if msg and msg["type"] == "pmessage" and msg["data"] == b"set":
                self.writes[msg["channel"].decode().split(":d:", 1)[1]] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()


def _skills_and_queries():
    out = []
    for name in TASKS:
        task = Task.load(name)
        skill = task.skill(4, 0, name=f"{name}-skill")
        queries = [task.format_input(e.text) for e in task.test[:QUERIES]]
        out.append((skill, queries))
    return out


@pytest.fixture(scope="module")
def expected() -> dict[tuple[str, str], tuple[str, int]]:
    """The single-process answers: ``EMLoCChatModel.invoke(query, skill=...)`` on its own store, one
    torch thread (as in each replica, where Ray sets one thread per CPU asked)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chat = EMLoCChatModel(registry=MemoryRegistry(model=MODEL, store=MemoryStore()), **CHAT_FIELDS)
        out = {}
        for skill, queries in _skills_and_queries():
            chat.get_registry().add(skill)
            for q in queries:
                reply = chat.invoke(q, skill=skill.name)
                out[(skill.name, q)] = (str(reply.content), reply.usage_metadata["input_token_details"]["cache_read"])
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cluster(redis_url: str) -> Iterator[tuple[str, str]]:
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as e:  # noqa: BLE001 - a machine where Ray cannot start: say why
        pytest.skip(f"Ray could not start here: {e}")
    namespace = "ray-" + uuid.uuid4().hex[:8]
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        factory = chat_factory(MODEL, redis_url, namespace=namespace, **CHAT_FIELDS)
        limits = {"max_request_bytes": 64 * 1024, "max_skill_bytes": 256 * 1024}
        serve.run(build_app(factory, replicas=2, app_options=limits), name="emloc", route_prefix="/")
        yield f"http://127.0.0.1:{port}", namespace
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(client, skill: str, query: str):
    reply = client.chat.completions.create(model=f"{MODEL}:{skill}", max_tokens=4,
                                           messages=[{"role": "user", "content": query}])
    return reply.model, reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens


def _load(client, jobs: list[tuple[str, str]], workers: int, on_done=None) -> list[tuple[tuple[str, str], object]]:
    def one(job: tuple[str, str]):
        try:
            result: object = _ask(client, *job)
        except Exception as e:  # noqa: BLE001 - a lost request is reported, not raised here
            result = e
        if on_done is not None:
            on_done()
        return job, result

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def _check(results, expected) -> None:
    failed = [(job, r) for job, r in results if isinstance(r, Exception)]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
    for (skill, query), (model, content, cached) in results:
        assert model == f"{MODEL}:{skill}"
        assert (content, cached) == expected[(skill, query)], (skill, query)


def test_replicas_share_one_store_and_survive_a_killed_replica(cluster, redis_url, expected) -> None:
    import openai

    url, namespace = cluster
    writes = MemoryWrites(redis_url, namespace)
    try:
        skills = _skills_and_queries()
        with httpx.Client(base_url=url, timeout=60) as http:
            for skill, _ in skills:
                answer = http.post("/v1/skills", json=skill_body(skill))
                assert answer.status_code == 201, answer.text
            assert http.get("/health").json()["status"] == "ok"
            # past the replicas' largest limit the ingress refuses it; past the chat limit, the replica
            for size, where in ((300 * 1024, "over 262144 bytes"), (100 * 1024, "65536")):
                big = http.post("/v1/chat/completions", content=b"x" * size, headers={"content-type": "application/json"})
                assert big.status_code == 413 and where in big.json()["error"]["message"], big.text
            # one request at a time: each skill is answered by one replica, always the same
            answered_by: dict[str, set[str]] = {}
            for skill, queries in skills:
                for q in queries:
                    reply = http.post("/v1/chat/completions", json={
                        "model": f"{MODEL}:{skill.name}", "max_tokens": 4, "messages": [{"role": "user", "content": q}]})
                    assert reply.json()["choices"][0]["message"]["content"] == expected[(skill.name, q)][0]
                    answered_by.setdefault(skill.name, set()).add(reply.headers["x-emloc-replica"])
            assert all(len(ids) == 1 for ids in answered_by.values()), answered_by
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
        jobs = [(s.name, q) for s, qs in skills for q in qs]
        load = [jobs[i % len(jobs)] for i in range(320)]
        t0 = time.monotonic()
        _check(_load(client, load, 32), expected)
        first = time.monotonic() - t0
        deadline = time.monotonic() + 5
        while sum(writes.writes.values()) < len(skills) and time.monotonic() < deadline:
            time.sleep(0.05)
        # every skill compressed exactly once across both replicas
        assert len(writes.writes) == len(skills) and set(writes.writes.values()) == {1}, writes.writes

        for skill, queries in skills:  # a stream comes back through the ingress chunk by chunk
            chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=f"{MODEL}:{skill.name}", max_tokens=4, stream=True,
                messages=[{"role": "user", "content": queries[0]}]) if c.choices]
            assert "".join(chunks) == expected[(skill.name, queries[0])][0] and len(chunks) > 1

        # one replica killed while 160 requests are under way: requests in flight on it fail inside Ray
        # (ActorDiedError); the ingress sends a non-streamed request again, so every one is answered
        replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::emloc#EMLoCModel#")]
        assert len(replicas) == 2, replicas
        done = threading.Semaphore(0)
        killer_done = threading.Event()

        def kill_after(n: int) -> None:
            for _ in range(n):
                done.acquire()
            ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
            killer_done.set()

        killer = threading.Thread(target=kill_after, args=(30,), daemon=True)
        killer.start()
        during = _load(client, [jobs[i % len(jobs)] for i in range(160)], 32, on_done=done.release)
        assert killer_done.wait(30)
        _check(during, expected)
        after = _load(client, jobs * 2, 8)  # after the kill: the live replica (and its replacement) answer
        _check(after, expected)
        assert set(writes.writes.values()) == {1}, writes.writes  # nothing compressed again
        print(f"320 requests in {first:.1f} s; 160 across the kill, {len(after)} after it")
    finally:
        writes.close()


@pytest.mark.parametrize(("path", "body", "skill"), [
    ("/v1/chat/completions", b'{"model": "tiny-llama:sst2-skill", "messages": []}', "sst2-skill"),
    ("/v1/chat/completions", b'{"model": "tiny-llama", "skill": "trec", "messages": []}', "trec"),
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": []}', ""),
    ("/v1/chat/completions", b"not json", ""),
    ("/v1/chat/completions", b"[1, 2]", ""),
    ("/v1/skills/agnews/compress", b"", "agnews"),
    ("/v1/skills", b'{"name": "rte", "demonstrations": []}', "rte"),
    ("/v1/skills", b'{"name": 3}', ""),
    ("/v1/models", b"", ""),
])
def test_the_ingress_reads_the_skill_to_route_by(path: str, body: bytes, skill: str) -> None:
    from emloc_agents.ray_serve import skill_of_request

    assert skill_of_request(path, body) == skill
