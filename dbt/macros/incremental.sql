{#
  The lower bound (a SQL timestamptz literal) of what an incremental run re-reads: the newest `column`
  already in this model, minus `minutes_back`, optionally capped at now() (so one event stamped in the
  future cannot push the bound past current data) and truncated to `grain` (so a bound never splits a
  window). Computed with run_query at execution time and inlined as a constant, so DuckDB can push it
  into the Delta/Parquet scan. Returns none when the model is empty (read everything).
#}
{% macro incremental_lower_bound(column, minutes_back, cap_at_now=false, grain=none) -%}
    {%- if not execute -%}{{ return(none) }}{%- endif -%}
    {%- set newest = "max(" ~ column ~ ")" -%}
    {%- if cap_at_now -%}{%- set newest = "least(" ~ newest ~ ", now())" -%}{%- endif -%}
    {%- set bound = newest ~ " - to_minutes(" ~ (minutes_back | int) ~ ")" -%}
    {%- if grain -%}{%- set bound = "date_trunc('" ~ grain ~ "', " ~ bound ~ ")" -%}{%- endif -%}
    {%- set value = run_query("select cast(" ~ bound ~ " as varchar) from " ~ this).columns[0].values()[0] -%}
    {{ return(none if value is none else "timestamptz '" ~ value ~ "'") }}
{%- endmacro %}

{# `where <column> >= <bound>` on incremental runs with a non-empty model; nothing otherwise. #}
{% macro incremental_filter(column, bound_column, minutes_back, cap_at_now=false, grain=none) -%}
    {%- if is_incremental() -%}
        {%- set bound = incremental_lower_bound(bound_column, minutes_back, cap_at_now, grain) -%}
        {%- if bound is not none %}where {{ column }} >= {{ bound }}{% endif -%}
    {%- endif -%}
{%- endmacro %}
