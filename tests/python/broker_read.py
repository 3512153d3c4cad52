"""Reads what keygate's Kafka and SQS webhook destinations wrote, with the clients a consumer
would use: confluent-kafka and boto3. Prints one JSON document on stdout.

  broker_read.py kafka-create BOOTSTRAP TOPIC PARTITIONS
  broker_read.py kafka-read BOOTSTRAP TOPIC
      every message of every partition from the beginning until none has come for a second:
      [{"partition", "offset", "key", "value", "headers": {name: value}}]
  broker_read.py sqs-read ENDPOINT QUEUE_URL WAIT_SECONDS
      receives (and deletes) what the queue holds until it is empty for WAIT_SECONDS:
      [{"body", "attributes": {name: value}, "group_id", "dedup_id"}]
AWS credentials and region come from the environment (the test's moto keys).
"""
import json
import os
import sys
import time


def kafka_create(bootstrap, topic, partitions):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=int(partitions), replication_factor=1)])
    for future in futures.values():
        future.result(timeout=30)
    print(json.dumps({"created": topic}))


def kafka_read(bootstrap, topic, quiet=1.0):
    """Every message of every partition from the beginning, in partition then offset order.

    It reads until no message has come for `quiet` seconds and every partition is at least at
    its high watermark, rather than up to the watermark only: tansu 0.6.0 answers ListOffsets
    (latest) with the last record batch's base offset + 1, not the log end offset, so a
    partition holding one batch of three records says 1.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "keygate-test-reader",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    metadata = consumer.list_topics(topic, timeout=30)
    if metadata.topics[topic].error is not None:
        raise SystemExit(f"kafka error: {metadata.topics[topic].error}")
    partitions = sorted(metadata.topics[topic].partitions)
    high = {}
    low = {}
    for p in partitions:
        low[p], high[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
    consumer.assign([TopicPartition(topic, p, low[p]) for p in partitions])
    position = dict(low)
    out = []
    deadline = time.time() + 30
    last = time.time()
    while time.time() < deadline:
        behind = any(position[p] < high[p] for p in partitions)
        if not behind and time.time() - last >= float(quiet):
            break
        message = consumer.poll(0.2)
        if message is None:
            continue
        if message.error():
            raise SystemExit(f"kafka error: {message.error()}")
        last = time.time()
        p = message.partition()
        position[p] = message.offset() + 1
        headers = {k: (v.decode("utf-8") if v is not None else None) for k, v in (message.headers() or [])}
        out.append({"partition": p, "offset": message.offset(),
                    "key": message.key().decode("utf-8") if message.key() is not None else None,
                    "value": message.value().decode("utf-8"), "headers": headers})
    for p in partitions:
        if position[p] < high[p]:
            raise SystemExit(f"partition {p}: read up to {position[p]} of {high[p]}")
    consumer.close()
    out.sort(key=lambda m: (m["partition"], m["offset"]))
    print(json.dumps(out))


def sqs_read(endpoint, queue_url, wait):
    import boto3

    # boto3 reads AWS_DEFAULT_REGION; the test environment (as keygate's SDK) names AWS_REGION.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name=region)
    out = []
    empty_since = time.time()
    while time.time() - empty_since < float(wait):
        answer = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                     MessageAttributeNames=["All"], AttributeNames=["All"])
        messages = answer.get("Messages", [])
        if not messages:
            time.sleep(0.1)
            continue
        empty_since = time.time()
        for m in messages:
            attributes = {k: v.get("StringValue") for k, v in m.get("MessageAttributes", {}).items()}
            system = m.get("Attributes", {})
            out.append({"body": m["Body"], "attributes": attributes,
                        "group_id": system.get("MessageGroupId"), "dedup_id": system.get("MessageDeduplicationId")})
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
    print(json.dumps(out))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"kafka-create": kafka_create, "kafka-read": kafka_read, "sqs-read": sqs_read}[command](*args)
