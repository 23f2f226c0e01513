{#
  User activity from Kafka, one row per broker message. The payload has no event id (a user id repeats
  across events), so a row is identified by its source coordinates (_stream, _partition, _offset):
  unique across bronze by the ingestion design, kept unique here against replays/backfills (the latest
  ingested copy wins, in a run and across runs through delete+insert on event_key).
  Incremental on _ingested_at (bronze is append-only; see var silver_overlap_minutes).
#}
{{ config(alias='user_activity', unique_key='event_key') }}

with bronze as (
    select * from {{ source('bronze', 'user_activity') }}
    {{ incremental_filter('_ingested_at', '_ingested_at', var('silver_overlap_minutes')) }}
)

select
    _stream || '/' || _partition || '/' || _offset as event_key,
    cast(id as bigint) as id,
    lower(trim(event)) as event,
    cast(value as bigint) as value,
    _timestamp as event_time,  -- Kafka record time (UTC)
    _source,
    _stream,
    cast(_partition as integer) as _partition,
    cast(_offset as bigint) as _offset,
    _batch_id,
    _ingested_at,
    _delta_version as _bronze_version  -- the bronze Delta version this row was read from
from bronze
where id is not null
qualify row_number() over (
    partition by _stream, _partition, _offset order by _ingested_at desc, _batch_id desc
) = 1
