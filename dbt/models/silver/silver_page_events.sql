{#
  Page events from the NATS stream `events` (subjects events.*), one row per stream message. No event
  id in the payload: identified by (_stream, _partition, _offset) = (subject, 0, stream sequence).
#}
{{ config(alias='page_events', unique_key='event_key') }}

with bronze as (
    select * from {{ source('bronze', 'page_events') }}
    {{ incremental_filter('_ingested_at', '_ingested_at', var('silver_overlap_minutes')) }}
)

select
    _stream || '/' || _partition || '/' || _offset as event_key,
    trim(page) as page,
    cast(user_id as bigint) as user_id,
    case when load_ms >= 0 then cast(load_ms as bigint) end as load_ms,
    regexp_extract(_stream, '[^.]+$') as subject_token,  -- last token of the subject (events.<token>)
    _timestamp as event_time,  -- JetStream stored time (UTC)
    _source,
    _stream,
    cast(_partition as integer) as _partition,
    cast(_offset as bigint) as _offset,
    _batch_id,
    _ingested_at,
    _delta_version as _bronze_version
from bronze
where page is not null and trim(page) <> ''
qualify row_number() over (
    partition by _stream, _partition, _offset order by _ingested_at desc, _batch_id desc
) = 1
