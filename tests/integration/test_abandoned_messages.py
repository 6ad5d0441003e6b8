"""Messages a live worker gave up while Redis was away are restored by that worker.

When a broker connection breaks, kombu gives back what the consumer holds (``restore_unacked``)
and Celery drops the tasks it reserved. With Redis unreachable that give-back fails; the
entries stay in ``unacked`` under the owner of a process whose lease lives on, so neither the
lease sweep nor the visibility-timeout restore ever touches them. Seen: one request of 80
``queued`` forever in ``test_a_redis_restart_with_work_queued_and_running_loses_nothing``.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest
import redis as redis_lib
from kombu import Connection, Exchange, Queue

from config.keys import UNACKED_KEY, UNACKED_OWNER_KEY
from tars_tasks.broker import leases, transport
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(redis_url):
    parts = urlsplit(redis_url)
    p = TcpProxy(target_host=parts.hostname, target_port=parts.port or 6379)
    yield p, urlunsplit(parts._replace(netloc=f"127.0.0.1:{p.port}"))
    p.close()


def test_a_failed_give_back_is_restored_once_redis_answers_and_a_running_task_waits(redis, redis_url, proxy):
    tcp, proxied_url = proxy
    transport.install()
    leases.release_owner()
    owner = leases.claim_owner(node="test")
    queue = Queue("tars.haiku", Exchange("tars.haiku", type="direct"), routing_key="tars.haiku")
    try:
        with Connection(redis_url) as direct:
            producer = direct.Producer()
            for i in range(3):
                producer.publish({"n": i}, exchange=queue.exchange, routing_key="tars.haiku", declare=[queue])
        held = Connection(proxied_url, transport_options={"socket_timeout": 2, "socket_connect_timeout": 2})
        channel = held.default_channel
        messages = [channel.basic_get("tars.haiku", no_ack=False) for _ in range(3)]
        tags = [m.delivery_tag for m in messages]
        assert redis.hlen(UNACKED_KEY) == 3
        assert {v.decode() for v in redis.hvals(UNACKED_OWNER_KEY)} == {owner}

        tcp.cut()  # Redis "restarts": the consumer's give-back fails
        with pytest.raises(redis_lib.ConnectionError):
            channel.qos.restore_unacked()
        assert sorted(leases.abandoned()) == sorted(tags)
        assert redis.hlen(UNACKED_KEY) == 3 and redis.llen("tars.haiku") == 0  # stuck under a live owner

        with Connection(redis_url) as fresh:  # the worker's restorer, once Redis answers
            ch = fresh.default_channel
            assert leases.restore_abandoned(ch, running={tags[0]}) == 2  # the one still running waits
            assert redis.llen("tars.haiku") == 2 and redis.hlen(UNACKED_KEY) == 1
            assert leases.abandoned() == [tags[0]]
            assert leases.restore_abandoned(ch, running=set()) == 1  # it ended: back too
            assert leases.restore_abandoned(ch, running=set()) == 0
        assert redis.llen("tars.haiku") == 3
        assert redis.hlen(UNACKED_KEY) == 0 and redis.hlen(UNACKED_OWNER_KEY) == 0
        try:
            held.release()
        except Exception:
            pass
    finally:
        leases._abandoned.clear()
        leases.release_owner()
