{#
  Jobs from the NATS work-queue stream `jobs`. The payload's job_id is the key (a publisher retry gets
  a new stream sequence but keeps its job_id); rows without one fall back to the source coordinates.
#}
{{ config(alias='jobs', unique_key='event_key') }}

with bronze as (
    select * from {{ source('bronze', 'jobs') }}
    {{ incremental_filter('_ingested_at', '_ingested_at', var('silver_overlap_minutes')) }}
)

select
    coalesce('job/' || job_id, 'msg/' || _stream || '/' || _partition || '/' || _offset) as event_key,
    cast(job_id as bigint) as job_id,
    trim(kind) as kind,
    case when duration_ms >= 0 then cast(duration_ms as bigint) end as duration_ms,
    _timestamp as event_time,  -- JetStream stored time (UTC)
    _source,
    _stream,
    cast(_partition as integer) as _partition,
    cast(_offset as bigint) as _offset,
    _batch_id,
    _ingested_at,
    _delta_version as _bronze_version
from bronze
qualify row_number() over (
    partition by event_key order by _ingested_at desc, _offset desc
) = 1
