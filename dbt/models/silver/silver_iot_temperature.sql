{#
  Temperature readings from MQTT. MQTT has no broker offsets or time; a reading does have a natural
  key: (sensor_id, reading time). Rows with a reading time are deduplicated on it (this also drops a
  publisher's own resend, which the ingestion cannot see); rows without one fall back to the source
  coordinates (_stream, _partition, _offset = the pipeline's MQTT sequence) and to receive time.
  `timestamp` may arrive as an ISO-8601 string or a UTC datetime: both are cast to timestamptz.
#}
{{ config(alias='iot_temperature', unique_key='event_key') }}

with bronze as (
    select *, try_cast("timestamp" as timestamptz) as reading_ts
    from {{ source('bronze', 'iot_temperature') }}
    {{ incremental_filter('_ingested_at', '_ingested_at', var('silver_overlap_minutes')) }}
)

select
    coalesce(
        'reading/' || trim(sensor_id) || '/' || epoch_us(reading_ts),
        'msg/' || _stream || '/' || _partition || '/' || _offset
    ) as event_key,
    trim(sensor_id) as sensor_id,
    cast(temperature as double) as temperature,
    cast(humidity as double) as humidity,
    coalesce(reading_ts, _timestamp) as reading_at,  -- event time for gold
    reading_ts is not null as has_reading_time,
    _source,
    _stream,
    cast(_partition as integer) as _partition,
    cast(_offset as bigint) as _offset,
    _timestamp as received_at,
    _batch_id,
    _ingested_at,
    _delta_version as _bronze_version
from bronze
where sensor_id is not null and trim(sensor_id) <> ''
qualify row_number() over (
    partition by event_key order by _ingested_at desc, _offset desc
) = 1
